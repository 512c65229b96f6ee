#!/usr/bin/env bash
# 两块 GPU 上的多进程运行（issue #5），随机权重、真实形状（benchmarks/make_random_models.py）：
# 同一组参数先单进程、再 `accelerate launch --multi_gpu --num_processes 2`，比较两个运行目录；
# 另外计时一次字母打分扫参（全部 1,273 题、15 个设置，单进程）。结果写到 $OUT（缺省 ./multigpu-out）。
set -euo pipefail
OUT=${OUT:-./multigpu-out}
TOK=${1:?用法：multigpu_run.sh <分词器目录>}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L | tee "$OUT/walls.txt"
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" | tee -a "$OUT/walls.txt"
python3 benchmarks/make_random_models.py --out /tmp/rm --tokenizer "$TOK" 2>&1 | tee "$OUT/make.log"
A=(--target /tmp/rm/target --expert /tmp/rm/expert --base /tmp/rm/base --no-load-in-4bit --dtype bfloat16
   --data-file data/medqa/test.jsonl --limit 64 --batch-size 8 --max-new-tokens 48 --compile off
   --temperature 0.7 --votes 2)
t0=$SECONDS; python3 main.py "${A[@]}" --output-dir /tmp/one > "$OUT/one.log" 2>&1 || { tail -40 "$OUT/one.log"; exit 1; }
echo "one process, wall incl. loading: $((SECONDS - t0)) s" | tee -a "$OUT/walls.txt"
t0=$SECONDS
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
    --dynamo_backend no main.py "${A[@]}" --output-dir /tmp/two > "$OUT/two.log" 2>&1 || { tail -40 "$OUT/two.log"; exit 1; }
echo "two processes, wall incl. loading: $((SECONDS - t0)) s" | tee -a "$OUT/walls.txt"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
one, two = "/tmp/one", "/tmp/two"
same_pred = open(f"{one}/predictions.jsonl", "rb").read() == open(f"{two}/predictions.jsonl", "rb").read()
m1, m2 = (json.load(open(f"{d}/metrics.json")) for d in (one, two))
strip = lambda m: {k: ({kk: vv for kk, vv in v.items() if kk != "timing"} if isinstance(v, dict) and "timing" in v else v)
                   for k, v in m.items()}
res = {"predictions_identical": same_pred, "metrics_identical_except_timing": strip(m1) == strip(m2),
       "records": sum(1 for _ in open(f"{one}/predictions.jsonl")),
       "timing_one_process": {a: m1[a]["timing"] for a in m1["arm_order"]},
       "timing_two_processes": {a: m2[a]["timing"] for a in m2["arm_order"]},
       "devices": [json.load(open(f"{d}/config.json"))["device"] for d in (one, two)],
       "processes": [json.load(open(f"{d}/config.json"))["processes"] for d in (one, two)]}
json.dump(res, open(f"{out}/compare.json", "w"), indent=2)
print(json.dumps(res, indent=2))
PY
cp /tmp/two/metrics.json "$OUT/metrics_two.json"
L=(--target /tmp/rm/target --expert /tmp/rm/expert --base /tmp/rm/base --no-load-in-4bit --dtype bfloat16
   --data-file data/medqa/test.jsonl --all-questions --batch-size 16 --scoring letter --sweep
   --sweep-alphas 0,0.5,1,2,4)
t0=$SECONDS; python3 main.py "${L[@]}" --output-dir /tmp/letter > "$OUT/letter.log" 2>&1 || { tail -40 "$OUT/letter.log"; exit 1; }
echo "letter sweep (1,273 questions, 18 settings), wall incl. loading: $((SECONDS - t0)) s" | tee -a "$OUT/walls.txt"
cp /tmp/letter/sweep.csv "$OUT/letter_sweep.csv"
python3 -c "import json; m=json.load(open('/tmp/letter/metrics.json')); print('letter scoring seconds', m['baseline']['timing'])" | tee -a "$OUT/letter.log"
