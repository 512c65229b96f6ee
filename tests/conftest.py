"""pytest 公共配置：把仓库根目录加入 sys.path，使测试能直接 `import config`、`import data_loader` 等扁平模块。"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
