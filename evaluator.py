"""手写的批量贪心解码循环（基线：只用目标模型；引导：三模型 logit 算术），答案抽取与统计。

为什么不用 `generate()`：引导需要在每一步同时拿到三个模型的 logits，再按 α(t) 融合后取 argmax，
且被选中的 token 必须喂回 *所有* 模型。结构仿照 gpt-fast 的 generate.py：
每个模型先对左填充的批次做一次 prefill（只计算最后一个位置的 logits），之后每步只喂一个 token，
每个模型保留自己的 KV 缓存。transformers 的细节（缓存类、参数名在 5.17 与 5.24 之间改过名）
全部收在 `ModelAdapter` 这一个小适配器里。
"""
from __future__ import annotations

import gc
import inspect
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Final, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from sampling import Sampling, pick_tokens
from steering_utils import SteeringParams, fuse_step

if TYPE_CHECKING:
    from fast.decoder import FastDecoder

# 故障注入（只给测试用）：不为 None 时，run_arm 在每次解码一批之前调用它，参数是这一批实际占用的批大小
# （快速路径为补齐后的 FastDecoder.batch_size）。测试用 monkeypatch 设置它来模拟 CUDA 显存不足；
# 没有任何环境变量或命令行参数能打开它，正常运行不可能意外触发。
_FAULT_HOOK: Callable[[int], None] | None = None


# ---------------------------------------------------------------------------
# transformers 适配器：唯一知道缓存类与参数名的地方
# ---------------------------------------------------------------------------

def cache_kwarg(model: PreTrainedModel) -> str:
    """forward 接收 KV 缓存的参数名：transformers 5.24 为 `cache`，5.17 为 `past_key_values`（都是公开参数）。"""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ModelAdapter:
    """包装一个因果语言模型，只暴露 prefill / decode 两个操作，返回 float32 的 (B, V_model) logits。

    transformers 5.24 的 forward 用 `cache=` 传 KV 缓存，5.17 用 `past_key_values=`；
    这里在构造时查一次签名，决定用哪个名字（均为公开参数，不碰私有 API）。
    同一个模型对象可以被多个角色共用：每个 adapter 持有自己的缓存。
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache_kwarg = cache_kwarg(model)
        self.cache: DynamicCache | None = None
        self.attention_mask: torch.Tensor | None = None  # (B, 已处理长度)：1 = 真实 token，0 = 左填充
        self.next_position: torch.Tensor | None = None  # (B, 1)：下一个 token 的位置编号

    @property
    def device(self) -> torch.device:
        """模型所在设备：输入 id、mask 与位置编号都放到这里。"""
        return self.model.device

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """对左填充的提示做一次前向，建立 KV 缓存，返回最后一个位置的 logits (B, V_model) float32。

        input_ids / attention_mask: (B, L)。位置编号由 mask 的累加和得到（每行从第一个真实 token 起为 0），
        与 `generate()` 的做法一致，所以左填充不会改变真实 token 的位置。logits_to_keep=1：
        128k 词表下只算最后一个位置，省下 (L−1)·V 的 lm_head 计算和显存。
        """
        self.cache = DynamicCache(config=self.model.config)
        self.attention_mask = attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        self.next_position = position_ids[:, -1:] + 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self.cache_kwarg: self.cache})
        return out.logits[:, -1, :].float()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """喂入每行一个新 token (B, 1)，返回它之后的 logits (B, V_model) float32；缓存与 mask 原地增长一列。"""
        assert self.attention_mask is not None and self.next_position is not None, "先调用 prefill"
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(tokens.shape[0], 1)], -1)
        out = self.model(input_ids=tokens, attention_mask=self.attention_mask, position_ids=self.next_position,
                         use_cache=True, **{self.cache_kwarg: self.cache})
        self.next_position = self.next_position + 1
        return out.logits[:, -1, :].float()


# ---------------------------------------------------------------------------
# 解码循环
# ---------------------------------------------------------------------------

@dataclass
class BatchResult:
    """一批的输出。tokens[i]：第 i 行生成的 id（含结束记号，若生成了的话；之后什么都没有）。

    alpha[i]：第 i 行在其被引导的每一步上的 α 值（只在引导模式下有；守卫触发、退回目标 logits 的步不计入）；
    steps：实际执行的解码步数；nonfinite[i]：第 i 行有多少个活跃步的融合 logits 非有限（NaN/+inf/整行 −inf），
    这些步改用目标模型的 logits（只在引导模式下有）。
    """

    tokens: list[list[int]]
    alpha: list[list[float]] | None
    steps: int
    nonfinite: list[int] | None = None


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """把变长 id 列表左填充成 (B, L_max) 的 input_ids 与 attention_mask（真实 token 靠右对齐）。"""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        if not ids:
            raise ValueError(f"第 {i} 个提示为空：至少需要一个 token")
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    return input_ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_batch(
    models: Sequence[PreTrainedModel],
    prompts: Sequence[Sequence[Sequence[int]]],
    *,
    vocab_size: int,
    max_new_tokens: int,
    end_ids: Sequence[int],
    pad_id: int,
    steering: SteeringParams | None = None,
    sampling: Sampling | None = None,
    question_ids: Sequence[int] | None = None,
) -> BatchResult:
    """对一批问题做贪心解码。基线：models = [目标]；引导：models = [目标, 专家, 基座]。

    prompts[k][i]：第 k 个模型看到的第 i 行提示 id（三个角色可以有各自的系统提示，
    因此长度可能不同；每个模型各自左填充、各自维护缓存）。每步：
      z_k = 各模型最后位置的 logits (B, V_model)，切到分词器词表 [:, :vocab_size]
            （模型多出的填充行永远不会被选中）；
      引导时经 fuse_step：α 按调度（默认 adaptive），z = z_t + α·(z_e − z_b)，可选可信度约束；否则 z = z_t；
      引导时再经 guard_nonfinite：z 的某行出现 NaN/+inf（或整行 −inf）时该行本步改用 z_t，并计数；
      next = argmax(z) (B,)（sampling 给出时按温度/top-p 抽样，随机数由 question_ids[i] 与步数决定），
      已结束的行改喂 pad_id 且不再记录；
      同一个 next 喂给所有模型（专家和基座“跟随”目标的实际生成）。
    某行生成任一结束记号即停止；全部停止或达到 max_new_tokens 时循环结束。
    """
    if steering is not None and len(models) != 3:
        raise ValueError("引导模式需要三个模型：[目标, 专家, 基座]")
    if len(prompts) != len(models) or len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts 必须为每个模型各给一份、且批大小相同")
    if sampling is not None and (question_ids is None or len(question_ids) != len(prompts[0])):
        raise ValueError("采样需要每行的题目 index（question_ids）：随机数由它决定，与批的组成无关")
    adapters = [ModelAdapter(m) for m in models]
    device = adapters[0].device
    batch = len(prompts[0])
    ends = torch.tensor(sorted(set(end_ids)), dtype=torch.long, device=device)
    qids = torch.tensor(list(question_ids) if question_ids is not None else [-1] * batch, dtype=torch.long,
                        device=device)

    # prefill：每个模型一次，只取最后位置的 logits。
    logits = []
    for adapter, role_prompts in zip(adapters, prompts):
        ids, mask = left_pad(role_prompts, pad_id, adapter.device)
        logits.append(adapter.prefill(ids, mask)[:, :vocab_size].to(device))

    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    alphas: list[torch.Tensor] = []  # 每步 (B,)
    nonfinite = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)：每行守卫触发的活跃步数
    steps = 0
    for step in range(max_new_tokens):
        if steering is None:
            fused = logits[0]
        else:
            fused, alpha, bad = fuse_step(logits[0], logits[1], logits[2], steering)
            nonfinite += bad & ~finished
            # nan = 该行已结束或本步退回了目标 logits（没有被引导），都不计入 α 统计
            alphas.append(alpha.masked_fill(finished | bad, float("nan")))
        nxt = pick_tokens(fused, sampling, qids, step).masked_fill(finished, pad_id)  # (B,)
        out[:, step] = nxt
        steps = step + 1
        finished = finished | torch.isin(nxt, ends)
        # 每步一次主机同步：参考路径优先简单可读；快速路径见 issue #3。
        if bool(finished.all()) or steps == max_new_tokens:
            break
        logits = [a.decode(nxt[:, None].to(a.device))[:, :vocab_size].to(device) for a in adapters]

    return BatchResult(tokens=_trim(out[:, :steps].tolist(), set(end_ids)),
                       alpha=_alpha_rows(alphas) if steering is not None else None, steps=steps,
                       nonfinite=nonfinite.tolist() if steering is not None else None)


def _trim(rows: list[list[int]], end_ids: set[int]) -> list[list[int]]:
    """每行截到第一个结束记号（含）为止：结束之后的填充不属于输出。"""
    trimmed = []
    for row in rows:
        cut = next((j + 1 for j, t in enumerate(row) if t in end_ids), len(row))
        trimmed.append(row[:cut])
    return trimmed


def _alpha_rows(alphas: list[torch.Tensor]) -> list[list[float]]:
    """[(B,)] × 步数 → 每行被引导的步上的 α 列表（去掉 nan 标记的步：已结束，或守卫退回了目标 logits）。"""
    if not alphas:
        return []
    table = torch.stack(alphas, 1).tolist()  # (B, steps)
    return [[a for a in row if not math.isnan(a)] for row in table]




# ---------------------------------------------------------------------------
# 一个模式（baseline / steered）跑完全部题目
# ---------------------------------------------------------------------------

class RunError(RuntimeError):
    """解码无法继续（批大小退到 1 仍然显存不足）：消息写明哪道题、怎么办。

    main.py 捕获后以退出码 3 结束、不打印 traceback，并打印 --resume 命令：已写入 predictions.jsonl 的记录都保留。
    """


@dataclass
class ArmResult:
    """一个模式在*本次会话*里的结果（指标不从这里算，而从持久的 predictions.jsonl 算，见 main.py）。

    records：本次新解码、已交给 on_batch 的逐题记录（按 index 升序；续跑时不含之前已记录的题）；
    seconds / decoded_tokens：本次的解码墙钟秒数（不含加载）与生成的 token 数；
    oom_backoffs：本次因显存不足把批减半的次数；interrupted：是否因 should_stop() 在完成之前停下；
    decode_path：实际走的解码路径（fast、compiled，快速路径时还有解析后的 overlap、stack 与 attention），写进 metrics.json，
    读者不必猜 auto 选了什么。
    """

    mode: str
    records: list[dict[str, Any]]
    seconds: float
    decoded_tokens: int
    oom_backoffs: int = 0
    interrupted: bool = False
    decode_path: dict[str, Any] = field(default_factory=dict)


def batch_plan(target_prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """题目位置 j → 批的划分：按目标提示长度降序（同长按 j）排序后每 batch_size 个一批。

    同批长度相近、填充少；最长的批先跑，显存不够会最早暴露。划分只取决于*全部*题目的提示长度与 batch_size，
    所以续跑时重新计算得到完全相同的批：剩下的批保持原来的组成与填充，续跑的输出与不中断的运行逐 token 相同
    （填充一变，fp32 下 argmax 的近似平局就可能翻转）。
    """
    order = sorted(range(len(target_prompts)), key=lambda j: (-len(target_prompts[j]), j))
    return [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]


def _free_memory(compiled: bool) -> None:
    """显存不足之后：回收 Python 端的引用，再把 PyTorch 缓存分配器里空闲的块还给 CUDA，给减半后的批腾地方。

    compiled=True 时先 torch.compiler.reset()：OOM 若发生在 CUDA graph 录制途中，cudagraph trees 的全局状态会不一致
    （H100、torch 2.11 上实测：减半后的新解码器第一次重放就在 dealloc_current_path_weakrefs 里 AssertionError）；
    重置同时释放旧图占着的显存池。代价是减半后的解码器重新编译一次（它的批形状本来就变了）。
    """
    if compiled:
        torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_arm(
    mode: str,
    questions: Sequence[Any],
    role_prompts: dict[str, list[list[int]]],
    models: dict[str, PreTrainedModel],
    tokenizer: Any,
    *,
    vocab_size: int,
    batch_size: int,
    max_new_tokens: int,
    end_ids: Sequence[int],
    steering: SteeringParams | None,
    fast: bool = True,
    compile: bool = False,
    progress: bool = True,
    done: Collection[int] = (),
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    roles: Sequence[str] | None = None,
    sampling: Sampling | None = None,
    shard: tuple[int, int] = (0, 1),
) -> ArmResult:
    """一个“臂”（arm：baseline、steered、扫参的某个设置、专家/基座单独、某条采样链）跑完全部题目。
    mode 是臂的名字，写进每条记录。roles：参与的模型角色——("target",)、("expert",) 这类单模型臂不融合；
    ("target", "expert", "base") 按 steering 融合。缺省按名字：baseline → 只有目标，其余 → 三个模型。
    sampling 为 None 时贪心，否则按 Sampling 采样（随机数由题目 index 决定）。
    fast=True 用 FastDecoder（compile 决定是否编译解码步），否则用慢速参考循环 generate_batch。
    role_prompts[角色][j] 是第 j 道题在该角色下的提示 id。
    批的划分见 batch_plan：同一配置的重复运行（以及续跑）完全相同。
    shard = (rank, world)：多进程时本进程只跑第 b 批满足 b % world == rank 的批——批的组成与单进程完全相同，
    所以每道题的输出与单进程逐 token 相同（填充与批形状都不变）。

    不丢进度（issue #4）：
    - done：本模式已记录的题目 index（续跑时来自 predictions.jsonl）。整批都已记录的批直接跳过；
      部分记录的批（只可能来自显存回退后写了一半的批，或被杀时写坏的最后一行）按原组成整批重跑，
      但只交出缺少的记录——同一题绝不交出两次。
    - on_batch(records)：每解码完一批调用一次（调用者追加写入并 fsync）；它返回后这批才算完成。
    - 显存不足（torch.OutOfMemoryError）：丢掉这批的中间结果与解码器、回收显存，批大小减半后重试*同一批*题目，
      直到 1；本模式余下的批都用减半后的大小。每次减半调用 on_event({"event": "oom_backoff", ...})。
      批大小 1 仍不够 → RunError，写明题目 index（之前交出的记录不受影响）。
    - should_stop()：每写完一批检查一次；为真且还有没做的批时停下，返回 interrupted=True。
    """
    from tqdm.auto import tqdm

    roles = tuple(roles) if roles is not None else (
        ("target",) if mode == "baseline" else ("target", "expert", "base"))
    if len(roles) not in (1, 3):
        raise ValueError(f"roles={roles!r}：单模型臂给一个角色，引导臂给 (target, expert, base)")
    steer = steering if len(roles) == 3 else None
    rank, world = shard
    done = set(done)
    mine = [chunk for b, chunk in enumerate(batch_plan(role_prompts["target"], batch_size)) if b % world == rank]
    plan = [chunk for chunk in mine if any(questions[j].index not in done for j in chunk)]
    # 整个模式只用一个缓存长度（最长提示 + max_new_tokens，向上取整）：所有批形状相同，解码步只编译一次。
    # 代价是短提示的批也要在完整长度上做注意力；每个长度桶各编译一次（每次约 1 分钟）在 H100 上更慢。
    # 按*全部*题目计算（而不是续跑时剩下的题）：续跑的批与原来的形状完全相同。
    longest = max(len(role_prompts[r][j]) for r in roles for j in range(len(questions)))
    size = min(batch_size, len(questions))

    def make_decoder(n: int) -> "FastDecoder | None":
        if not fast:
            return None
        from fast.decoder import FastDecoder, length_bucket  # 快速引擎只在快速路径上导入

        return FastDecoder([models[r] for r in roles], vocab_size=vocab_size, end_ids=end_ids,
                           pad_id=tokenizer.pad_token_id, batch_size=n, steering=steer, compile=compile,
                           cache_len=length_bucket(longest + max_new_tokens), sampling=sampling)

    def decode(chunk: list[int], decoder: "FastDecoder | None") -> BatchResult:
        prompts = [[role_prompts[r][j] for j in chunk] for r in roles]
        qids = [questions[j].index for j in chunk]
        if _FAULT_HOOK is not None:
            _FAULT_HOOK(decoder.batch_size if decoder is not None else len(chunk))
        if decoder is not None:
            return decoder.generate(prompts, max_new_tokens, question_ids=qids)
        return generate_batch([models[r] for r in roles], prompts, vocab_size=vocab_size,
                              max_new_tokens=max_new_tokens, end_ids=end_ids, pad_id=tokenizer.pad_token_id,
                              steering=steer, sampling=sampling, question_ids=qids)

    decoder = make_decoder(size)
    decode_path: dict[str, Any] = {"fast": fast, "compiled": fast and compile}
    if decoder is not None:
        decode_path.update(overlap=decoder.overlap, stack=decoder.stack, attention=decoder.attention)
    records: list[dict[str, Any]] = []
    decoded_tokens = backoffs = 0
    interrupted = False
    own = [questions[j].index for chunk in mine for j in chunk]  # 本进程负责的题（单进程时为全部）
    bar = tqdm(total=len(own), initial=sum(i in done for i in own), desc=mode, unit="q", disable=not progress)
    start = time.perf_counter()
    for b, chunk in enumerate(plan):
        pending = [chunk]
        while pending:
            sub = pending.pop(0)
            if len(sub) > size:  # 回退之后，原来的整批按新的大小切开（仍是同一批题，顺序不变）
                pending[:0] = [sub[lo:lo + size] for lo in range(0, len(sub), size)]
                continue
            try:
                result: BatchResult | None = decode(sub, decoder)
            except torch.OutOfMemoryError as exc:
                result, oom = None, str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
            if result is None:
                # 在 except 块之外清理：异常的 traceback 引用着出错帧里的张量，块结束后才会释放。
                attempted = decoder.batch_size if decoder is not None else len(sub)
                decoder = None
                _free_memory(compiled=fast and compile)
                if attempted == 1:
                    raise RunError(
                        f"第 {questions[sub[0]].index} 题（{mode} 模式）在批大小 1 时仍然显存不足（{oom}）。"
                        "请减小 --max-new-tokens、使用 --load-in-4bit，或换显存更大的 GPU；"
                        "之前完成的题目都已写入 predictions.jsonl。")
                size = max(1, attempted // 2)
                backoffs += 1
                if on_event is not None:
                    on_event({"event": "oom_backoff", "mode": mode, "batch_size_from": attempted,
                              "batch_size_to": size, "indices": sorted(questions[j].index for j in sub)})
                print(f"[evaluator] {mode}：显存不足，批大小 {attempted} → {size}，重试同一批题目", flush=True)
                decoder = make_decoder(size)
                pending.insert(0, sub)
                continue
            new: list[dict[str, Any]] = []
            for row, j in enumerate(sub):
                if questions[j].index in done:
                    continue  # 上次已记录（部分记录的批整批重跑，只补缺的）
                new.append(make_record(mode, questions[j], result.tokens[row], tokenizer,
                                       result.alpha[row] if result.alpha is not None else None,
                                       result.nonfinite[row] if result.nonfinite is not None else None))
                decoded_tokens += len(result.tokens[row])
            if new and on_batch is not None:
                on_batch(new)
            done.update(r["index"] for r in new)
            records.extend(new)
            bar.update(len(new))
        if should_stop is not None and b + 1 < len(plan) and should_stop():
            interrupted = True
            break
    bar.close()
    return ArmResult(mode=mode, records=sorted(records, key=lambda r: r["index"]),
                     seconds=time.perf_counter() - start, decoded_tokens=decoded_tokens, oom_backoffs=backoffs,
                     interrupted=interrupted, decode_path=decode_path)


ALPHA_DECIMALS: int = 4  # 逐 token α 的保存精度：α 量级为 1，万分之一足够作图，又让每题 512 步的记录保持小巧


def make_record(mode: str, question: Any, tokens: list[int], tokenizer: Any,
                alpha: list[float] | None, nonfinite: int | None = None) -> dict[str, Any]:
    """predictions.jsonl 的一行：mode、index、gold、pred（字母或 None）、correct、output、num_tokens；
    引导模式另有 alpha（该题被引导的每一步的 α，保留 ALPHA_DECIMALS 位小数：α 直方图与轨迹图的原料）、
    alpha_mean / alpha_min / alpha_max（由未取整的 α 算出）与 nonfinite_steps（融合 logits 非有限、改用目标 logits 的步数）。

    output 用 skip_special_tokens=True 解码；num_tokens 含结束记号（若生成了）。
    记录里没有任何计时或会话信息：续跑与不中断的运行写出的记录逐字节相同。
    """
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    pred = extract_answer(text)
    rec: dict[str, Any] = {"mode": mode, "index": question.index, "gold": question.answer_idx, "pred": pred,
                           "correct": pred == question.answer_idx, "output": text, "num_tokens": len(tokens)}
    if alpha is not None:
        rec.update(alpha_mean=sum(alpha) / len(alpha) if alpha else None,
                   alpha_min=min(alpha) if alpha else None, alpha_max=max(alpha) if alpha else None,
                   alpha=[round(a, ALPHA_DECIMALS) for a in alpha])
    if nonfinite is not None:
        rec["nonfinite_steps"] = int(nonfinite)
    return rec


# ---------------------------------------------------------------------------
# 统计：准确率的 95% 置信区间、配对的精确 McNemar 检验
# ---------------------------------------------------------------------------

def wilson_ci95(correct: int, n: int) -> list[float] | None:
    """准确率的 95% Wilson 区间 [low, high]（scipy.stats.binomtest）；n = 0 时为 None。
    Wilson 而非正态近似：准确率靠近 0 或 1、n 只有几十时正态区间会越出 [0, 1]。"""
    from scipy.stats import binomtest

    if not n:
        return None
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return [ci.low, ci.high]


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """精确 McNemar 双侧 p 值：只看不一致的题对（fixed = b，broken = c），H0 下 b ~ Binomial(b + c, 1/2)。
    题量几百时不一致对往往只有几十个，卡方近似不可靠，所以用精确二项检验；没有不一致对时 p = 1。"""
    from scipy.stats import binomtest

    return binomtest(int(fixed), int(fixed + broken), 0.5).pvalue if fixed + broken else 1.0


def arm_metrics(mode: str, records: Sequence[dict[str, Any]], *, oom_backoffs: int = 0,
                timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """一个模式的指标，从逐题记录（predictions.jsonl，持久的唯一来源）算出：n、correct、accuracy、
    95% Wilson 区间、unparsed（抽不出答案的题数，计为错）、generated_tokens（所有记录的 num_tokens 之和）、
    oom_backoffs；引导模式另有 alpha_mean（按题平均的 alpha_mean 再平均）与 nonfinite_steps（守卫触发的总步数）。

    墙钟相关的数字只放在 "timing" 子对象里：续跑与不中断的运行除 timing 之外完全相同（测试就是这样比较的）。
    """
    n = len(records)
    correct = sum(r["correct"] for r in records)
    out: dict[str, Any] = {
        "n": n, "correct": correct, "accuracy": correct / n if n else None, "ci95": wilson_ci95(correct, n),
        "unparsed": sum(r["pred"] is None for r in records),
        "generated_tokens": sum(r["num_tokens"] for r in records),
        "oom_backoffs": oom_backoffs,
    }
    if any("alpha_mean" in r for r in records):  # 融合臂（steered 与扫参的每个设置）
        alpha = [r["alpha_mean"] for r in records if r.get("alpha_mean") is not None]
        out["alpha_mean"] = sum(alpha) / len(alpha) if alpha else None
        out["nonfinite_steps"] = sum(r.get("nonfinite_steps", 0) for r in records)
    out["timing"] = timing or {}
    return out


def arm_timing(arm: ArmResult) -> dict[str, Any]:
    """本次会话的计时（metrics.json 里的 "timing"）：解码秒数、本次生成的 token 数、tokens/s。

    续跑时只统计续跑这一次；这些数字因机器负载而异，不参与“结果相同”的比较。
    """
    return {"seconds": round(arm.seconds, 3), "decoded_tokens": arm.decoded_tokens,
            "tokens_per_second": arm.decoded_tokens / arm.seconds if arm.seconds > 0 else None,
            "decode_path": arm.decode_path}


def compare_arms(baseline: Sequence[dict[str, Any]], steered: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """同一批题上的配对比较（参数为两个模式的逐题记录）：Δ 准确率、被引导“修好”/“弄坏”的题目 index、
    精确 McNemar 双侧 p 值（mcnemar_exact_p）。
    """
    base = {r["index"]: r["correct"] for r in baseline}
    steer = {r["index"]: r["correct"] for r in steered}
    if base.keys() != steer.keys():
        raise ValueError("两个模式的题目集合不同，无法做配对比较")
    fixed = sorted(i for i in base if steer[i] and not base[i])
    broken = sorted(i for i in base if base[i] and not steer[i])
    p = mcnemar_exact_p(len(fixed), len(broken))
    n = len(base)
    return {"n": n, "delta": (sum(steer.values()) - sum(base.values())) / n if n else None,
            "fixed": fixed, "broken": broken, "both_correct": sum(base[i] and steer[i] for i in base),
            "both_wrong": sum(not base[i] and not steer[i] for i in base), "mcnemar_exact_p": p}


# ---------------------------------------------------------------------------
# 答案抽取
# ---------------------------------------------------------------------------
# 设计说明（三层优先级）：
# 本模块只包含 :func:`extract_answer`，之后会由负责人整体粘贴进 ``evaluator.py``。
#
# 背景
# ----
# 模型收到的指令是：
#
#     Think step by step, then finish with a line of the form "The answer is X",
#     where X is A, B, C or D.
#
# 但实际输出来自 Llama-3.1-8B-Instruct、一个 1B 医学模型和一个 135M 小模型，文本往往很“脏”：
# markdown 加粗/标题、LaTeX ``\\boxed{}``、大小写混乱、因 token 上限而被截断，
# 并且推理过程中会大量提到其它选项字母（"Option A is wrong because…"、"(C) is tempting"）。
# 同时医学文本本身充满会“伪装成选项”的大写字母：病例开头的冠词 "A 45-year-old man"、
# "vitamin B12"、"hepatitis B"、"type A"、"Group B strep"、"HbA1c" 等。
#
# 因此抽取采用 **三层优先级**，每层内部都“取最后一个”：
#
# 1. 显式答案陈述（"The answer is C" / "Answer: (B)" / "correct option is A" /
#    "I would choose C" / ``\\boxed{B}`` / "D is the correct answer" 等）。
#    这是指令要求的格式，可信度最高；若出现多次，以 **最后一次** 为准，
#    因为模型常常先给出初步结论、再自我修正，最后一句才是最终决定。
#    若最后一条显式陈述给出的是 A–D 以外的字母（如 "The answer is E"），直接返回 ``None``——
#    模型的最终表态就是一个无效答案，退回到更早的陈述反而是在替模型“改答案”。
# 2. 带括号字母的结论句（"The most likely diagnosis is pheochromocytoma (B)."）。
#    语气是结论性的，但没有 "answer" 这类标记词，可靠性低于第 1 层，所以仅在第 1 层完全缺失时使用，
#    并且要求括号字母位于行尾，避免把句中对选项的讨论当成结论。
# 3. 最后一个非空行只是一个孤立字母（"B" / "(B)" / "B." / "**B**"）或
#    “字母 + 简短选项文本”（"B. Hypertension"）。这是最弱的证据：只看文本的最末一行，
#    且选项文本不能含有推理性词汇（is / not / because / ruled out …），
#    否则它更可能是被截断的逐项分析（"B. Hypertension can be ruled out…"）。
#
# 三层都没有命中时返回 ``None``：宁可判为“无答案”，也不从普通单词或选项讨论中猜一个字母。

# 合法的选项字母集合（MedQA-USMLE 四选项版本）。
_VALID: Final[frozenset[str]] = frozenset("ABCD")

# 聊天模板残留的特殊 token（如 "<|eot_id|>"、"</s>"），会干扰“最后一行”的判断，先删除。
_SPECIAL_TOKEN: Final[re.Pattern[str]] = re.compile(r"<\|[^|>]*\|>|</?s>")

# “宽松”字母：大写且独立成词。
#   - 排除 I：它几乎总是代词（"The answer is I think B"）。
#   - (?![\w'\-])：排除 "B12"、"A1c"、"B-cell"、"A's" 这类粘连写法。
#   - (?![ \t]+\d)：排除冠词 "A 45-year-old …"（"Answer: A 45-year-old man …"）。
#   捕获范围是 A–Z（而非 A–D），目的是识别出 "The answer is E" 这种无效最终答案。
_LOOSE: Final[str] = r"[A-HJ-Z](?![\w'\-])(?![ \t]+\d)"
# “严格”字母：允许小写，但字母后必须紧跟收尾标点或行尾（"ANSWER: c"、"answer is (b)."）。
#   这样 "the answer is a deficiency of …" 里的冠词 a 永远不会被当成选项。
_STRICT: Final[str] = r"[A-HJ-Za-hj-z](?=[ \t]*(?:[.):\]}*]|$))"

# 第 1 层（正向）：标记词 + 连接词 + 可选修饰 + 字母。
_EXPLICIT: Final[re.Pattern[str]] = re.compile(
    rf"""
    (?:
        # (a) "answer" / "correct option" / "best choice" 等标记词，后面必须跟连接词：
        #     要么是 ":" "=" "-"（可夹 markdown 星号，如 "**Answer**: B"），
        #     要么是 is / would be / should be …。强制连接词是为了排除
        #     "Answer choice A is incorrect" 这种在讨论选项的句子。
        (?i:\b(?:answer|(?:correct|best|right|final)\s+(?:option|choice)))
        (?:[ \t]*\**[ \t]*[:=\-—]|(?i:\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be)))
        # 可选的语气副词："the answer is most likely C"、"the answer is therefore B"。
        (?i:\s+(?:most\s+likely|likely|probably|clearly|definitely|therefore|thus))?
      | # (b) 第一人称选择："I would choose C" / "I'd select B" / "I will go with option D"。
        \bI(?i:(?:\s+would|\s+will|'d|'ll)?\s+(?:choose|select|pick|go\s+with))
      | # (c) LaTeX 盒子本身就是显式答案标记："$\boxed{{B}}$"。
        \\boxed\{{
    )
    (?:
        # 同一行：跳过冒号、markdown 星号/下划线、括号、$、\boxed{{、\text{{ 以及
        # "option"/"choice"/"letter" 前缀（"answer is option D"），再取宽松或严格字母。
        [ \t:*_=(\[{{$\-]*(?:\\(?:boxed|text|textbf|mathrm)\{{)*[ \t*_(\[{{]*
        (?i:(?:option|choice|letter)[ \t]*\(?)?
        ({_LOOSE}|{_STRICT})
      | # 换行：标记在行尾、字母在下一行（"The answer is:\n\nB. Hypertension"）。
        # 跨行时只接受严格字母，防止 "Answer:\nA patient with …" 的冠词 A 被误抓。
        [ \t:*_]*\n[\s*_#>(\[]*({_STRICT})
    )
    """,
    re.VERBOSE | re.MULTILINE,
)

# 第 1 层（反向）："D is the correct answer" / "Option B is the best choice"。
# 字母前必须是 option/choice、行首/标点，或 so/thus/therefore/hence 这类连接词；
# 这样 "Hepatitis B is the most likely answer" 中的 B 不会被当成选项。
_REVERSE: Final[re.Pattern[str]] = re.compile(
    r"""
    (?:(?i:\b(?:option|choice))\s+|^[ \t*_]*|[.:;,!?*][ \t]*|(?i:\b(?:so|thus|therefore|hence|then))\s+)
    \(?([A-HJ-Z])\)?[ \t*_]*
    (?i:\s+is\s+(?:the\s+)?(?:correct|right|best|most\s+likely|most\s+appropriate)\s+(?:answer|option|choice))
    """,
    re.VERBOSE | re.MULTILINE,
)

# 第 2 层：结论句（most likely / most appropriate / best）在行尾以 "(X)" 收束。
# 只接受括号形式且必须在行尾，因为句中的 "(B)" 常常只是在引用某个选项进行比较。
_HEDGED: Final[re.Pattern[str]] = re.compile(
    r"(?i:\b(?:most\s+likely|most\s+appropriate|best)\b)[^\n]{0,200}?\(([A-D])\)[ \t*_]*[.!]?[ \t*_]*$",
    re.MULTILINE,
)

# 第 3 层：最后一行是 "(B)" / "B" / "B." / "B)"，或 "B. 选项文本"。
# 字母后若还有文本，必须先有 ")"、"."、":" 分隔——因此 "A 45-year-old …" 不会匹配。
_FINAL_LINE: Final[re.Pattern[str]] = re.compile(
    r"^(?:\(([A-D])\)|([A-D])(?:[.:)]|(?=$)))[.:]?(?:\s+(?P<rest>.+))?$"
)
# 选项文本中出现这些词，说明这一行是在“分析”选项而不是“给出”答案。
_REASONING: Final[re.Pattern[str]] = re.compile(
    r"(?i)\b(?:is|are|was|were|be|can|could|may|might|would|should|because|since|"
    r"not|no|unlikely|incorrect|wrong|ruled?|excluded?|less|but|tempting)\b"
)


def extract_answer(text: str) -> str | None:
    """从 CoT 输出中抽取最终选项字母。

    参数:
        text: 模型生成的完整文本（可能含 markdown、LaTeX、被截断）。

    返回:
        ``'A'``–``'D'`` 之一；若没有可信的结论（空文本、截断、只讨论选项、
        最终显式答案不在 A–D 内）则返回 ``None``。

    优先级（详见模块文档）：显式陈述（取最后一个）> 行尾括号结论句 > 最后一行孤立字母。
    """
    if not text or not text.strip():
        return None
    text = _SPECIAL_TOKEN.sub("", text)

    # 第 1 层：正向与反向的显式陈述统一按字母在文本中的位置排序，取最靠后者。
    # 每个模式的捕获组互斥（要么宽松分支、要么跨行分支），lastindex 即命中的那一组。
    explicit: list[tuple[int, str]] = [
        (m.start(m.lastindex or 0), m.group(m.lastindex or 0))
        for pattern in (_EXPLICIT, _REVERSE)
        for m in pattern.finditer(text)
    ]
    if explicit:
        letter = max(explicit)[1].upper()
        # 最终表态是无效字母（如 E）时直接放弃，而不是回退到更早的陈述。
        return letter if letter in _VALID else None

    # 第 2 层：结论句的行尾括号字母，同样取最后一个。
    hedged: list[str] = _HEDGED.findall(text)
    if hedged:
        return hedged[-1]

    # 第 3 层：只看最后一个非空行，去掉 markdown 修饰（**、#、>、反引号、列表短横线）。
    lines = [ln.strip(" \t*_#>`-") for ln in text.splitlines()]
    last = next((ln for ln in reversed(lines) if ln), "")
    m = _FINAL_LINE.match(last)
    if m is None:
        return None
    rest = m.group("rest")
    if rest and (len(rest) > 80 or _REASONING.search(rest)):
        return None
    return m.group(1) or m.group(2)
