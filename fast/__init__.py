"""快速解码引擎（与研究代码隔开）：FastDecoder 与它的解码步（decoder.py）、叠加前向 StackedLlama（stacked.py）、
Triton 解码注意力（attention.py）。

只在快速路径被使用时才导入（evaluator.run_arm 在函数内部导入；bench.py 直接导入）；
慢速参考循环、打分与统计都不依赖这里。FastDecoder 对共享模型的改动只在 generate() 之内，返回前恢复。
"""
