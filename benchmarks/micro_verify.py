"""微基准（issue 17 第 5 条）：投机解码的验证代价，以及由实测代价算出的 tokens/s 投影。

随机权重、真实形状（bench.random_model：8B 目标，1B 专家与基座；CUDA 上 bf16），测三件事：
1. 验证代价：在已写入 prompt 个 token 的静态 KV 缓存后面，一次前向 q = 1 与 q = K+1 个新位置
   （含 lm_head：验证要 K+1 个位置的 logits）的毫秒数，分三组：target（8B 单独）、pair（专家与基座两个 1B）、
   steered（三者全部，即引导时的验证），批 1 / 16 / 64；以及比值 cost(K+1) / cost(1)。
   target 组末尾加 float32 argmax；steered 组末尾加简单的 float32 融合 z_t + α·(z_e − z_b) 与 argmax
   （不是 fuse_step 的自适应 α：后者在快速路径里被编译融合，这里的 eager 版只会夸大它）。
2. 草稿代价：1B 专家单独走一步（q = 1，含 argmax），它是最自然的草稿。
3. 投影（只是算术，不是端到端运行）：每个位置独立地以概率 a 被接受时，一轮的期望产出
   E = (1 − a^(K+1)) / (1 − a)（a = 1 时为 K+1），一轮的代价 = K 步草稿 + 一次 K+1 个位置的引导验证；
   与不投机的引导步（steered 组 q = 1）比较加速比，并给出每个 (批, a) 的最优 K。另给“草稿不花时间”的
   变体（oracle 草稿、代价为 0）：它是任何草稿所能达到的上限。

实现：transformers 的公开前向 model(input_ids, attention_mask=4 维布尔掩码, position_ids, cache=StaticCache)。
- 注意力：注册一个“打包 GQA”实现（verify_attention）：共享一个 KV 头的 n_rep 个查询头与 q 个位置并成查询长度维，
  不复制 K/V（transformers 自带的 sdpa 在有掩码时 repeat_kv，批 64 时每层多搬几百 MB，会淹没要测的差别）。
  q = 1 时与 fast/decoder.py 的 packed_gqa_attention 是同一个 SDPA 调用。读满整个静态缓存（cache_len 个槽位）。
- 写入位置：transformers 5.17 与 5.24 的 StaticCache 都按每层设备上的 cumulative_length 写（两版都没有
  cache_position 参数），每次前向之前把它原地设回 prompt（set_write_slot），所以每次重放都写同样的槽位、做同样的事。
  构造只用两版都有的参数 StaticCache(config=, max_cache_len=)；forward 的缓存参数名由 evaluator.cache_kwarg 决定。
- 计时：CUDA 上先 eager 跑两次（cuBLAS 等惰性初始化），再把整组前向手动录成一张 CUDA graph，重放计时（CUDA events）；
  录制失败时退回 eager 计时并在行里记下原因。--compile on 时每个模型的前向先 torch.compile（不带 cudagraphs）再录制：
  每个 (模型, 批, q) 都要编译一次，8B 每次约几十秒，8 分钟内只够很少几个形状，所以默认 off。
  与快速路径的差别：这里三个模型串在一条流上、没有叠加前向与 Triton 注意力（bench.py 的引导步更快），
  所以比值与投影衡量的是“同一实现下多验证几个位置”的代价。

    python benchmarks/micro_verify.py --out benchmarks/results/micro_verify_h200.json   # GPU，约几分钟
    python benchmarks/micro_verify.py --preset tiny --device cpu                        # 冒烟测试，几秒
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel, StaticCache
from transformers.masking_utils import sdpa_mask

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import environment, finish, prompts_for, random_model  # noqa: E402
from evaluator import cache_kwarg  # noqa: E402

VERIFY_ATTENTION = "spec_verify_packed_gqa"  # 注册到 transformers 的注意力实现名
FUSION_ALPHA = 1.0  # steered 组的简单融合用的常数 α（取值不影响时间）
GROUPS: tuple[str, ...] = ("target", "pair", "steered")  # 验证代价的三组；另有 "draft"（专家单独，q = 1）
PROJECTION_NOTE = ("ARITHMETIC PROJECTION from the measured forward costs, not an end-to-end run: each drafted "
                   "position is accepted independently with probability a; a round = K draft steps (1B expert, "
                   "q=1) + one steered verify of K+1 positions and yields (1 - a^(K+1)) / (1 - a) tokens per row; "
                   "the baseline is one plain steered step (q=1) per token. draft='free' sets the draft cost to 0 "
                   "(an oracle at zero cost: the bound for any draft).")


def verify_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """任意 q 的打包 GQA 注意力，不复制 K/V。

    query (B, H, q, D)，key/value (B, H_kv, L, D)（整个静态缓存），attention_mask (B, 1, q, L) 布尔（True = 可见）。
    repeat_kv 的头顺序是 h = k·n_rep + r，所以 query 可以看成 (B, H_kv, n_rep, q, D)，再把 (n_rep, q) 并成
    长度 n_rep·q 的查询维：第 r·q + i 行是第 r 个组内头的第 i 个位置，它的掩码是原掩码的第 i 行（在 r 上复制）。
    q = 1 时掩码直接在 n_rep 维上广播，与 fast/decoder.py 的 packed_gqa_attention 相同。
    返回 (B, q, H, D)（transformers 的注意力实现的约定），以及 None（不返回注意力权重）。
    """
    n_rep = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    length = key.shape[2]
    packed = query.reshape(batch, heads // n_rep, n_rep * q_len, dim)
    mask = attention_mask
    if mask is not None and q_len > 1:
        mask = mask[:, :, None].expand(batch, 1, n_rep, q_len, length).reshape(batch, 1, n_rep * q_len, length)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def use_verify_attention(models: Sequence[PreTrainedModel]) -> None:
    """把各模型的注意力实现换成 verify_attention（这些是本脚本自己建的随机模型，不必恢复）。
    掩码函数也要注册，否则 transformers 不认这个名字；实际上总是传 4 维掩码，transformers 原样交给注意力。"""
    AttentionInterface.register(VERIFY_ATTENTION, verify_attention)
    AttentionMaskInterface.register(VERIFY_ATTENTION, sdpa_mask)
    for m in models:
        m.set_attn_implementation(VERIFY_ATTENTION)


def set_write_slot(cache: StaticCache, slot: int) -> None:
    """把静态缓存每层的写入指针（设备上的 0 维张量 cumulative_length，transformers 5.17 与 5.24 相同）原地设为 slot。

    为什么原地 fill_：它录进 CUDA graph 是一次设备上的写，每次重放都从同一个槽位写起；换成新张量则图里录的是旧地址。
    没有这样的指针（别的 transformers 版本）就报错，而不是测到写越界或写到别处的前向。
    """
    for layer in cache.layers:
        pointer = getattr(layer, "cumulative_length", None)
        if not isinstance(pointer, torch.Tensor):
            raise RuntimeError("this transformers version's StaticCache layers have no tensor write pointer "
                               "(cumulative_length); micro_verify.py needs transformers 5.17-5.24")
        pointer.fill_(slot)


def visible_mask(batch: int, start: int, q_len: int, length: int, device: str) -> torch.Tensor:
    """位置 start … start+q−1 的 q 个查询对长度 length 的静态缓存的可见掩码 (B, 1, q, L) 布尔：
    第 i 个查询看见槽位 s ≤ start + i（提示没有左填充：所有行同长）。连续存储，可作录图的静态输入。"""
    slots = torch.arange(length, device=device)
    rows = start + torch.arange(q_len, device=device)
    return (slots[None, :] <= rows[:, None]).expand(batch, 1, q_len, length).contiguous()


def forward_logits(model: Callable[..., Any], kwarg: str, cache: StaticCache, ids: torch.Tensor,
                   positions: torch.Tensor, mask: torch.Tensor, slot: int) -> torch.Tensor:
    """一次前向：ids/positions (B, q)、mask (B, 1, q, L)，从槽位 slot 起写 q 个 K/V。
    返回全部 q 个位置的 logits (B, q, V)（模型精度；logits_to_keep 缺省 0 = 全部位置，即验证要的 lm_head）。"""
    set_write_slot(cache, slot)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{kwarg: cache})
    return out.logits


def prefill(model: PreTrainedModel, cache: StaticCache, prompt: torch.Tensor) -> None:
    """把提示 (B, P) 写进缓存槽位 0 … P−1（因果掩码，只留最后一个位置的 logits，不计时）。"""
    batch, length = prompt.shape
    positions = torch.arange(length, device=prompt.device).expand(batch, length)
    mask = visible_mask(batch, 0, length, cache.layers[0].max_cache_len, str(prompt.device))
    set_write_slot(cache, 0)
    model(input_ids=prompt, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
          **{cache_kwarg(model): cache})


def group_fn(group: str, runners: list[Callable[..., Any]], kwargs: list[str], caches: list[StaticCache],
             ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, slot: int
             ) -> Callable[[], tuple[torch.Tensor, ...]]:
    """一组要计时的工作（无参函数，可录成 CUDA graph）。runners/kwargs/caches 按 [目标, 专家, 基座] 排列。

    target：目标 logits (B, q, V) → float32 argmax (B, q)；pair：专家与基座各一次前向，返回两路 logits；
    steered：三次前向 → float32 的 z_t + α·(z_e − z_b) → argmax (B, q)；draft：专家单独，→ argmax。
    """
    def run(k: int) -> torch.Tensor:
        return forward_logits(runners[k], kwargs[k], caches[k], ids, positions, mask, slot)

    if group == "target":
        return lambda: (run(0).float().argmax(-1),)
    if group == "pair":
        return lambda: (run(1), run(2))
    if group == "draft":
        return lambda: (run(1).float().argmax(-1),)

    def steered() -> tuple[torch.Tensor, ...]:
        zt, ze, zb = run(0), run(1), run(2)
        return ((zt.float() + FUSION_ALPHA * (ze.float() - zb.float())).argmax(-1),)

    return steered


def replayable(fn: Callable[[], tuple[torch.Tensor, ...]], device: str) -> tuple[Callable[[], Any], str | None]:
    """fn → (重放函数, 录制失败的原因或 None)。CUDA 上：在一条侧流上 eager 跑两次（惰性初始化），再录成 CUDA graph，
    返回 graph.replay（图与它的输出缓冲由闭包持有）；录制出错时返回 fn 本身与错误文字（该行以 eager 计时）。CPU 上直接返回 fn。"""
    if not device.startswith("cuda"):
        return fn, None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            out = fn()
    except Exception as exc:  # noqa: BLE001 — 记下原因，退回 eager 计时
        torch.cuda.synchronize()
        return fn, f"{type(exc).__name__}: {exc}"[:300]

    def replay() -> tuple[torch.Tensor, ...]:
        graph.replay()
        return out

    return replay, None


def time_ms(run: Callable[[], Any], device: str, warmup: int, iters: int, repeats: int) -> dict[str, Any]:
    """run 的每次毫秒：预热 warmup 次，再测 repeats 段、每段 iters 次（CUDA events；CPU 用墙钟），
    报告各段平均的中位数与最小值。"""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        run()
    if cuda:
        torch.cuda.synchronize()
    per: list[float] = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                run()
            end.record()
            end.synchronize()
            per.append(start.elapsed_time(end) / iters)
        else:
            begin = time.perf_counter()
            for _ in range(iters):
                run()
            per.append(1000 * (time.perf_counter() - begin) / iters)
    return {"ms": round(statistics.median(per), 4), "ms_min": round(min(per), 4), "ms_runs": [round(x, 4) for x in per]}


def expected_tokens(a: float, k: int) -> float:
    """每个草稿位置独立以概率 a 被接受时，一轮（K 个草稿 + 一次验证）每行的期望产出：
    接受前 j 个的概率 a^j(1−a)（j < K），全部接受 a^K；产出 = 接受数 + 1（验证给出的修正或额外 token），
    期望 Σ_{i=0..K} a^i = (1 − a^(K+1)) / (1 − a)，a = 1 时为 K+1，a = 0 时恰为 1。"""
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance a={a} must be in [0, 1]")
    return float(k + 1) if a == 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def breakeven(k: int, plain_ms: float, round_ms: float) -> float | None:
    """加速比恰为 1 的接受率 a*（expected_tokens(a*, K) · plain = round，二分）；a = 1 也不够时为 None。
    expected_tokens 在 [0, 1] 上单调增，所以二分得到唯一解；a = 0 已经够（round ≤ plain）时为 0。"""
    need = round_ms / plain_ms
    if expected_tokens(0.0, k) >= need:
        return 0.0
    if expected_tokens(1.0, k) < need:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < need else (lo, mid)
    return round(hi, 4)


def projection(costs: dict[tuple[str, int, int], float], batches: Sequence[int], ks: Sequence[int],
               accepts: Sequence[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """由实测毫秒 costs[(组, 批, q)] 算投影行与每个 (批, a, 草稿) 的最优 K。

    plain = steered q=1（每 token 一步）；一轮 = K · draft(q=1) + steered(q=K+1)（draft="free" 时草稿为 0）；
    每行 tokens/s = 批 · E · 1000 / 一轮毫秒；加速比 = E · plain / 一轮毫秒。缺测量（OOM 等）的组合跳过。
    """
    rows: list[dict[str, Any]] = []
    best: list[dict[str, Any]] = []
    for batch in batches:
        plain = costs.get(("steered", batch, 1))
        draft = costs.get(("draft", batch, 1))
        if plain is None:
            continue
        for kind, step_ms in (("expert", draft), ("free", 0.0)):
            if step_ms is None:
                continue
            for a in accepts:
                candidates = []
                for k in ks:
                    verify = costs.get(("steered", batch, k + 1))
                    if verify is None:
                        continue
                    e = expected_tokens(a, k)
                    round_ms = k * step_ms + verify
                    row = {"batch": batch, "draft": kind, "a": a, "K": k, "tokens_per_round": round(e, 6),
                           "draft_ms": round(step_ms, 4), "verify_ms": round(verify, 4), "round_ms": round(round_ms, 4),
                           "plain_ms": round(plain, 4), "tok_per_s": round(batch * e * 1000 / round_ms, 1),
                           "plain_tok_per_s": round(batch * 1000 / plain, 1),
                           "speedup": round(e * plain / round_ms, 4), "breakeven_a": breakeven(k, plain, round_ms)}
                    rows.append(row)
                    candidates.append(row)
                if candidates:
                    top = max(candidates, key=lambda r: r["speedup"])
                    best.append({"batch": batch, "draft": kind, "a": a, "best_K": top["K"],
                                 "speedup": top["speedup"], "tok_per_s": top["tok_per_s"],
                                 "plain_tok_per_s": top["plain_tok_per_s"], "worth_it": top["speedup"] > 1.0})
    return rows, best


def ratios(costs: dict[tuple[str, int, int], float], batches: Sequence[int], ks: Sequence[int]
           ) -> list[dict[str, Any]]:
    """每组、每批、每个 K：cost(q=K+1) / cost(q=1)。"""
    out = []
    for group in GROUPS:
        for batch in batches:
            one = costs.get((group, batch, 1))
            for k in ks:
                many = costs.get((group, batch, k + 1))
                if one is not None and many is not None:
                    out.append({"group": group, "batch": batch, "K": k, "ms_q1": one, "ms_qK1": many,
                                "ratio": round(many / one, 4)})
    return out


def measure_batch(models: list[PreTrainedModel], runners: list[Callable[..., Any]], batch: int,
                  args: argparse.Namespace, start: float) -> list[dict[str, Any]]:
    """一个批大小：三个模型各建静态缓存并预填充同一份提示，再对每个 q 测三组、对 q = 1 另测草稿。每行打印一行 JSON。"""
    device = args.device
    vocab = models[0].config.vocab_size
    prompt = torch.tensor(prompts_for(batch, args.prompt, vocab), dtype=torch.long, device=device)  # (B, P)
    kwargs = [cache_kwarg(m) for m in models]
    caches = [StaticCache(config=m.config, max_cache_len=args.cache_len) for m in models]
    for m, c in zip(models, caches):
        prefill(m, c, prompt)
    print(f"[{time.perf_counter() - start:6.1f}s] batch {batch}: {args.prompt} prompt tokens in each cache", flush=True)
    rows: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(batch)
    for q in [1] + [k + 1 for k in args.ks]:
        ids = torch.randint(10, vocab - 10, (batch, q), generator=g).to(device)
        positions = (args.prompt + torch.arange(q, device=device)).expand(batch, q).contiguous()
        mask = visible_mask(batch, args.prompt, q, args.cache_len, device)
        for group in GROUPS + (("draft",) if q == 1 else ()):
            row: dict[str, Any] = {"group": group, "batch": batch, "q": q, "K": q - 1, "prompt": args.prompt,
                                   "cache_len": args.cache_len, "compiled": args.compile == "on"}
            try:
                fn = group_fn(group, runners, kwargs, caches, ids, positions, mask, args.prompt)
                run, graph_error = replayable(fn, device)
                row.update(time_ms(run, device, args.warmup, args.iters, args.repeats))
                row["cuda_graph"] = device.startswith("cuda") and graph_error is None
                if graph_error is not None:
                    row["graph_error"] = graph_error
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
            except Exception as exc:  # noqa: BLE001 — 记录失败并继续其余组合
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["elapsed_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            run = fn = None  # 释放图与它的显存池（引用计数即可；gc.collect 每次约 0.5 s，只在每个批结束时做）
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    del caches
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def print_tables(report: dict[str, Any], ks: Sequence[int]) -> None:
    """给人看的三张表：验证代价与比值、草稿代价、投影（标明是算术）。"""
    costs = {(r["group"], r["batch"], r["q"]): r for r in report["rows"]}
    print("\nVerify cost: ms per forward (ratio = cost(K+1 positions) / cost(1 position))")
    print(f"{'group':<9}{'batch':>6}{'q=1':>10}" + "".join(f"{'K=' + str(k):>16}" for k in ks))
    for group in GROUPS:
        for batch in report["args"]["batches"]:
            one = costs.get((group, batch, 1), {})
            cells = []
            for k in ks:
                r = costs.get((group, batch, k + 1), {})
                cells.append(f"{r['ms']:.3f} ({r['ms'] / one['ms']:.2f}x)" if "ms" in r and "ms" in one
                             else r.get("error", "-")[:15])
            print(f"{group:<9}{batch:>6}{one.get('ms', float('nan')):>10.3f}" + "".join(f"{c:>16}" for c in cells))
    print("\nDraft cost (1B expert alone, q=1): " + ", ".join(
        f"batch {b}: {costs[('draft', b, 1)]['ms']:.3f} ms" for b in report["args"]["batches"]
        if "ms" in costs.get(("draft", b, 1), {})))
    print(f"\n{PROJECTION_NOTE}")
    proj = {(r["batch"], r["draft"], r["a"], r["K"]): r for r in report["projection"]["rows"]}
    print(f"{'batch':>6} {'draft':<7}{'a':>5}" + "".join(f"{'K=' + str(k):>9}" for k in ks) + "   best K (speed-up)")
    for b in report["projection"]["best"]:
        cells = [f"{proj[key]['speedup']:.2f}x" if (key := (b["batch"], b["draft"], b["a"], k)) in proj else "-"
                 for k in ks]
        print(f"{b['batch']:>6} {b['draft']:<7}{b['a']:>5}" + "".join(f"{c:>9}" for c in cells)
              + f"   K={b['best_K']} ({b['speedup']:.2f}x, {b['tok_per_s']:.0f} vs {b['plain_tok_per_s']:.0f} tok/s)")


def parse_list(text: str, kind: type) -> list[Any]:
    """逗号分隔的列表（空项忽略）。"""
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """命令行入口：按批大小测验证代价与草稿代价，算比值与投影，打印表格与整份 JSON（最后一行），--out 另写文件。"""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", choices=("real", "tiny"), default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--ks", default="2,4,6,8", help="draft lengths K; each verify forward has K+1 positions")
    parser.add_argument("--accept", default="0,0.5,0.7,0.9", help="per-position acceptance probabilities a for the projection")
    parser.add_argument("--prompt", type=int, default=256, help="tokens already in the KV cache before the verify")
    parser.add_argument("--cache-len", type=int, default=512, help="static cache length (the attention reads all of it)")
    parser.add_argument("--warmup", type=int, default=3, help="replays before timing")
    parser.add_argument("--iters", type=int, default=20, help="replays per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks (the median block is reported)")
    parser.add_argument("--compile", choices=("off", "on"), default="off",
                        help="on: torch.compile each model's forward before the CUDA-graph capture (one compilation "
                             "per model, batch and q: slow, use few shapes)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    args.batches, args.ks = parse_list(args.batches, int), parse_list(args.ks, int)
    args.accept = parse_list(args.accept, float)
    if args.preset == "tiny":
        args.prompt, args.cache_len = min(args.prompt, 16), min(args.cache_len, 64)
    if not args.batches or min(args.batches) < 1 or not args.ks or min(args.ks) < 1:
        parser.error("--batches and --ks need positive integers")
    if any(not 0.0 <= a <= 1.0 for a in args.accept):
        parser.error(f"--accept {args.accept}: each a must be in [0, 1]")
    if args.prompt < 1 or args.prompt + max(args.ks) + 1 > args.cache_len:
        parser.error(f"--prompt {args.prompt} + max K + 1 = {args.prompt + max(args.ks) + 1} must fit in "
                     f"--cache-len {args.cache_len}")
    if min(args.iters, args.repeats) < 1 or args.warmup < 0:
        parser.error("--iters and --repeats must be at least 1, --warmup at least 0")
    start = time.perf_counter()
    env = environment()
    print(json.dumps({"env": env, "args": vars(args)}), flush=True)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with torch.inference_mode():
        models = [random_model(k, args.preset, dtype, args.device, s) for k, s in (("8b", 0), ("1b", 1), ("1b", 2))]
        use_verify_attention(models)
        runners: list[Callable[..., Any]] = (
            [torch.compile(m, dynamic=False, fullgraph=True) for m in models] if args.compile == "on" else list(models))
        print(f"[{time.perf_counter() - start:6.1f}s] models ready ({args.preset}, {dtype}, {args.device})", flush=True)
        rows: list[dict[str, Any]] = []
        # 编译时每个 (模型, 批, q) 各编译一次：放宽 dynamo 的重编译上限（缺省 8 次后静默退回 eager）
        with torch._dynamo.config.patch(recompile_limit=256):
            for batch in args.batches:
                rows += measure_batch(models, runners, batch, args, start)
    costs = {(r["group"], r["batch"], r["q"]): r["ms"] for r in rows if "ms" in r}
    proj_rows, best = projection(costs, args.batches, args.ks, args.accept)
    report: dict[str, Any] = {"env": env, "args": vars(args), "rows": rows,
                              "ratios": ratios(costs, args.batches, args.ks),
                              "projection": {"note": PROJECTION_NOTE, "rows": proj_rows, "best": best},
                              "total_s": round(time.perf_counter() - start, 1)}
    print_tables(report, args.ks)
    print(f"\ntotal {report['total_s']} s", flush=True)
    return finish(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
