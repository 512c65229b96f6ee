"""解码：唯一的 transformers 适配器（ModelAdapter）、参考解码循环（generate_batch）、一个臂的运行（run_arm）
与字母打分的前向（score_letters）。

快速路径从 run_arm 的 make_decoder 开始：只有 fast=True 时才在函数内导入 fast.decoder.FastDecoder。
参考循环是手写的批量贪心解码（基线：只用目标模型；引导：三模型 logit 算术）。

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
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from config import ROLES
from sampling import Sampling, pick_tokens
from scoring import (ForcedAnswer, LetterScores, Record, forced_predictions, forced_row_ids, make_record,
                     with_forced)
from steering_utils import SteeringParams, distance, fuse_step, nonfinite_rows, stop_nonfinite_target

if TYPE_CHECKING:
    from fast.decoder import FastDecoder
    from speculative import Speculation

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
        assert self.attention_mask is not None and self.next_position is not None, "call prefill first"
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
    这些步改用目标模型的 logits（只在引导模式下有）；target_stops[i]：第 i 行是否因 *目标* logits 非有限而在某步
    干净地停止（1 = 是，0 = 否；所有臂都有，见 steering_utils.stop_nonfinite_target）——停止的那一步不输出 token。
    """

    tokens: list[list[int]]
    alpha: list[list[float]] | None
    steps: int
    nonfinite: list[int] | None = None
    target_stops: list[int] | None = None


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """把变长 id 列表左填充成 (B, L_max) 的 input_ids 与 attention_mask（真实 token 靠右对齐）。"""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        if not ids:
            raise ValueError(f"prompt {i} is empty: at least one token is needed")
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
    on_step: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """对一批问题做贪心解码。基线：models = [目标]；引导：models = [目标, 专家, 基座]。

    prompts[k][i]：第 k 个模型看到的第 i 行提示 id（三个角色可以有各自的系统提示，
    因此长度可能不同；每个模型各自左填充、各自维护缓存）。每步：
      z_k = 各模型最后位置的 logits (B, V_model)，切到分词器词表 [:, :vocab_size]
            （模型多出的填充行永远不会被选中）；
      引导时经 fuse_step：α 按调度（默认 adaptive），z = z_t + α·(z_e − z_b)，可选可信度约束；否则 z = z_t；
      引导时再经 guard_nonfinite：z 的某行出现 NaN/+inf（或整行 −inf）时该行本步改用 z_t，并计数；
      所有臂再经 stop_nonfinite_target：z_t 本身的某行非有限时该行在本步停止（不输出这一步的 token，记入 target_stops）；
      next = argmax(z) (B,)（sampling 给出时按温度/top-p 抽样，随机数由 question_ids[i] 与步数决定），
      已结束的行改喂 pad_id 且不再记录；
      同一个 next 喂给所有模型（专家和基座“跟随”目标的实际生成）。
    某行生成任一结束记号即停止；全部停止或达到 max_new_tokens 时循环结束。
    on_step(已走的步数, 本步新生成的 token 数 = 本步之前仍活跃的行数)：每步调用一次的进度回调
    （参考循环本来就每步同步主机）；各次之和等于输出的 token 总数（含结束记号）。
    """
    if steering is not None and len(models) != 3:
        raise ValueError("steering needs three models: [target, expert, base]")
    if len(prompts) != len(models) or len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts must give one batch per model, all of the same batch size")
    if sampling is not None and (question_ids is None or len(question_ids) != len(prompts[0])):
        raise ValueError("sampling needs each row's question index (question_ids): the random numbers depend on it, not on the batch")
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
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)：因目标 logits 非有限而停止的行
    emitted = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)：每行真正输出的 token 数
    steps = 0
    for step in range(max_new_tokens):
        fused = logits[0]
        if steering is not None:
            fused, alpha, bad = fuse_step(logits[0], logits[1], logits[2], steering)
        fused, stop = stop_nonfinite_target(logits[0], fused)
        stop = stop & ~finished
        if steering is not None:
            nonfinite += bad & ~finished & ~stop
            # nan = 该行已结束、本步停止，或本步退回了目标 logits（没有被引导），都不计入 α 统计
            alphas.append(alpha.masked_fill(finished | bad | stop, float("nan")))
        nxt = pick_tokens(fused, sampling, qids, step).masked_fill(finished | stop, pad_id)  # (B,)
        out[:, step] = nxt
        steps = step + 1
        live = ~(finished | stop)
        emitted += live
        stopped |= stop
        if on_step is not None:
            on_step(steps, int(live.sum()))
        finished = finished | stop | torch.isin(nxt, ends)
        # 每步一次主机同步：参考路径优先简单可读；快速路径见 issue #3。
        if bool(finished.all()) or steps == max_new_tokens:
            break
        logits = [a.decode(nxt[:, None].to(a.device))[:, :vocab_size].to(device) for a in adapters]

    return BatchResult(tokens=_trim(out[:, :steps].tolist(), set(end_ids), emitted.tolist()),
                       alpha=_alpha_rows(alphas) if steering is not None else None, steps=steps,
                       nonfinite=nonfinite.tolist() if steering is not None else None,
                       target_stops=stopped.long().tolist())


def _trim(rows: list[list[int]], end_ids: set[int], lengths: Sequence[int] | None = None) -> list[list[int]]:
    """每行截到第一个结束记号（含）为止：结束之后的填充不属于输出。lengths[i] 给出时先截到前 lengths[i] 个
    （每行真正输出的 token 数：因目标 logits 非有限而停止的行，停止那一步及之后写的是 pad，不属于输出）。"""
    trimmed = []
    for i, row in enumerate(rows):
        row = row[:lengths[i]] if lengths is not None else row
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
    records: list[Record]
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


def kv_cache_bytes(config: Any, batch: int, length: int, dtype: torch.dtype) -> int:
    """一个模型的 KV 缓存字节数（纯函数，只读模型配置）：层数 × 2（K 与 V）× batch × KV 头数 × length × head_dim × 元素字节。

    与真实的缓存对象逐字节相同（tests/test_memory_bounds.py 核对）：参考循环的 DynamicCache 每层 K、V 各是
    (B, H_kv, 已处理长度, D)；FastDecoder 的 StaticCache 每层各是 (B, H_kv, cache_len, D)，StackedLlama 把 M 个模型的
    缓存叠成 (M·B, H_kv, cache_len, D)——字节数相同。缓存的精度就是模型的计算精度（4-bit 时为 bf16）。
    """
    heads = getattr(config, "num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers) * 2 * batch * int(kv_heads) * length * int(head_dim) * \
        torch.empty((), dtype=dtype).element_size()


def cache_length(longest: int, max_new_tokens: int, *, fast: bool, speculate: int = 0) -> int:
    """一个臂的每行 KV 缓存槽位数（run_arm 分配的，以及内存估计用的同一规则）。longest = 该臂各角色最长的提示。

    快速路径：FastDecoder 按 length_bucket(longest + max_new_tokens) 一次分配静态缓存（所有批同一形状），
    投机时（fast.speculative.SpeculativeDecoder）按 length_bucket(longest + (K+1)·max_new_tokens)；
    参考循环：DynamicCache 逐步增长，最多 longest + max_new_tokens 个槽位（最后一个 token 不再喂入，实际少 1）；
    投机循环（speculate = K > 0）：每轮追加 K+1 列、至少产出 1 个 token，最坏 longest + (K+1)·max_new_tokens。
    """
    if fast:
        from fast.decoder import length_bucket  # 快速引擎只在需要时导入

        return length_bucket(longest + (speculate + 1) * max_new_tokens)
    return longest + (speculate + 1) * max_new_tokens


def _free_memory(compiled: bool) -> None:
    """显存不足之后：回收 Python 端的引用，再把 PyTorch 缓存分配器里空闲的块还给 CUDA，给减半后的批腾地方。

    compiled=True 时先 torch.compiler.reset()：OOM 若发生在 CUDA graph 录制途中，cudagraph trees 的全局状态会不一致
    （torch 2.11 上：减半后的新解码器第一次重放就在 dealloc_current_path_weakrefs 里 AssertionError）；
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
    on_batch: Callable[[list[Record]], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    roles: Sequence[str] | None = None,
    sampling: Sampling | None = None,
    shard: tuple[int, int] = (0, 1),
    forced: ForcedAnswer | None = None,
    speculation: "Speculation | None" = None,
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

    答案抽取第二阶段（forced 不为 None 时）：一批解码完、记录交出之前，第一阶段（make_record 里的 extract_answer）
    没读出答案的行由 forced_letters 接上 cue 再各做一次前向，结果经 scoring.with_forced 写进记录；
    这一前向与解码在同一个显存回退的 try 里（它也可能显存不足）。forced 为 None 时 pred_forced 恒为 None。

    投机解码（issue 17，speculation 给出时）：参考循环用 speculative.generate_speculative，快速路径用
    fast.speculative.SpeculativeDecoder（只做贪心；采样的投机解码 fast=True 时报错，绝不悄悄退回），两者的贪心输出都与
    不投机时逐 token 相同；每条记录加上 drafted / accepted / verify_steps。基线臂的草稿是专家（models["expert"] 作为
    独立草稿模型，看专家的提示）；引导臂按 speculation.draft。不含目标的单模型臂（扫参的 expert_alone / base_alone）
    不投机：1B 给 1B 起草省不下任何前向。
    """
    from tqdm.auto import tqdm

    roles = tuple(roles) if roles is not None else (
        ("target",) if mode == "baseline" else ROLES)
    if len(roles) not in (1, 3):
        raise ValueError(f"roles={roles!r}: a single-model arm takes one role, a steered arm takes (target, expert, base)")
    steer = steering if len(roles) == 3 else None
    spec = speculation if speculation is not None and speculation.k > 0 and "target" in roles else None
    if spec is not None:
        from speculative import generate_speculative, record_fields  # speculative 导入本模块：只在用到时导入

        if fast and sampling is not None:
            raise ValueError("speculative sampling runs in the reference loop only: use fast=False (--no-fast)")
        if steer is None and "expert" not in models:
            raise ValueError(f"arm {mode!r}: the speculative draft of a target-only arm is the expert, "
                             "but no expert model was loaded")
    rank, world = shard
    done = set(done)
    mine = [chunk for b, chunk in enumerate(batch_plan(role_prompts["target"], batch_size)) if b % world == rank]
    plan = [chunk for chunk in mine if any(questions[j].index not in done for j in chunk)]
    # 整个模式只用一个缓存长度（最长提示 + max_new_tokens，向上取整）：所有批形状相同，解码步只编译一次。
    # 代价是短提示的批也要在完整长度上做注意力；每个长度桶各编译一次则更慢（编译很贵）。
    # 按*全部*题目计算（而不是续跑时剩下的题）：续跑的批与原来的形状完全相同。
    drafting = ("expert",) if spec is not None and steer is None else ()  # 基线臂的草稿（专家）与其他角色一起左填充
    longest = max(len(role_prompts[r][j]) for r in roles + drafting for j in range(len(questions)))
    size = min(batch_size, len(questions))

    def make_decoder(n: int) -> "FastDecoder | None":
        if not fast:
            return None
        from fast.decoder import FastDecoder  # 快速引擎只在快速路径上导入

        common = dict(vocab_size=vocab_size, end_ids=end_ids, pad_id=tokenizer.pad_token_id, batch_size=n,
                      steering=steer, compile=compile)
        if spec is not None:
            from fast.speculative import SpeculativeDecoder

            # 基线臂：专家只作草稿（第 2 个模型），选词只看目标
            return SpeculativeDecoder([models[r] for r in roles] + ([models["expert"]] if steer is None else []),
                                      k=spec.k, draft=spec.draft, min_acceptance=spec.min_acceptance,
                                      cache_len=cache_length(longest, max_new_tokens, fast=True, speculate=spec.k),
                                      **common)
        return FastDecoder([models[r] for r in roles], cache_len=cache_length(longest, max_new_tokens, fast=True),
                           sampling=sampling, **common)

    def decode(chunk: list[int], decoder: "FastDecoder | None") -> BatchResult:
        prompts = [[role_prompts[r][j] for j in chunk] for r in roles]
        qids = [questions[j].index for j in chunk]
        if _FAULT_HOOK is not None:
            _FAULT_HOOK(decoder.batch_size if decoder is not None else len(chunk))
        on_step = (lambda steps, new_tokens: step_progress(len(chunk), steps, new_tokens)) if progress else None
        if decoder is not None:
            if spec is not None and steer is None:
                prompts = prompts + [[role_prompts["expert"][j] for j in chunk]]  # 草稿（专家）看专家的提示
            return decoder.generate(prompts, max_new_tokens, question_ids=qids, on_step=on_step)
        if spec is not None:
            alone = steer is None  # 只有目标：专家作为独立的草稿模型
            return generate_speculative(
                [models[r] for r in roles], prompts, vocab_size=vocab_size, max_new_tokens=max_new_tokens,
                end_ids=end_ids, pad_id=tokenizer.pad_token_id, steering=steer, sampling=sampling,
                question_ids=qids, k=spec.k, draft=spec.draft, sampling_rule=spec.sampling_rule,
                min_acceptance=spec.min_acceptance, draft_model=models["expert"] if alone else None,
                draft_prompts=[role_prompts["expert"][j] for j in chunk] if alone else None)
        return generate_batch([models[r] for r in roles], prompts, vocab_size=vocab_size,
                              max_new_tokens=max_new_tokens, end_ids=end_ids, pad_id=tokenizer.pad_token_id,
                              steering=steer, sampling=sampling, question_ids=qids, on_step=on_step)

    def step_progress(rows: int, steps: int, new_tokens: int) -> None:
        # 批内进度：按已走步数 / max_new_tokens 推进这批题的一部分（批结束时再补齐到整数），
        # 后缀显示本次会话的 tokens/s；tqdm 据此给出剩余时间的估计。
        live["tokens"] += new_tokens
        within = min(rows * steps / max_new_tokens, rows - 0.51)  # 显示取整后批结束前不会显示成整批完成
        bar.update(max(0.0, live["base"] + within - bar.n))
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            bar.set_postfix_str(f"{live['tokens'] / elapsed:.1f} tok/s", refresh=False)

    def finish(chunk: list[int], result: BatchResult) -> list[Record]:
        """一批的记录（跳过已记录的题）：第一阶段在 make_record 里；第一阶段没读出答案的行再走第二阶段。"""
        rows = [row for row, j in enumerate(chunk) if questions[j].index not in done]
        new = [make_record(mode, questions[chunk[row]], result.tokens[row], tokenizer,
                           result.alpha[row] if result.alpha is not None else None,
                           result.nonfinite[row] if result.nonfinite is not None else None,
                           result.target_stops[row] if result.target_stops is not None else None) for row in rows]
        # 因目标 logits 非有限而停止的题不走第二阶段：同一个目标模型在同一上下文上的字母 logits 不可信，
        # 对 NaN 取 argmax 会悄悄给出一个字母。它的 pred 只来自第一阶段（多半为 None，计为错）。
        need = [k for k, rec in enumerate(new) if rec["pred_text"] is None and not rec.get("nonfinite_target_stops")]
        if forced is not None and need:
            letters = stage2_letters(models, role_prompts, roles, [chunk[rows[k]] for k in need],
                                     [result.tokens[rows[k]] for k in need], end_ids, forced,
                                     vocab_size=vocab_size, steering=steer)
            for k, letter in zip(need, letters):
                # None：第二阶段的前向里目标 logits 非有限——与解码时一样记为停止，没有字母（计为错）
                new[k] = with_forced(new[k], letter) if letter is not None else {**new[k], "nonfinite_target_stops": 1}
        if spec is not None:
            for k, row in enumerate(rows):
                new[k].update(record_fields(result, row))  # type: ignore[typeddict-item]
        return new

    decoder = make_decoder(size)
    decode_path: dict[str, Any] = {"fast": fast, "compiled": fast and compile}
    if spec is not None:
        decode_path.update(speculate=spec.k, draft=spec.draft)
    if decoder is not None:
        decode_path.update(overlap=decoder.overlap, stack=decoder.stack, attention=decoder.attention)
    records: list[Record] = []
    decoded_tokens = backoffs = 0
    interrupted = False
    own = [questions[j].index for chunk in mine for j in chunk]  # 本进程负责的题（单进程时为全部）
    bar = tqdm(total=len(own), initial=sum(i in done for i in own), desc=mode, unit="q", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} q [{elapsed}<{remaining}{postfix}]")
    live = {"tokens": 0, "base": float(bar.n)}  # 本次会话已生成的 token 数；已完成的题数（批内进度的起点）
    if decoder is not None and decoder.compile and plan:
        # 第一批先编译解码步（4 位时还要给每种权重形状实测选 kernel）：GPU 上要一到三分钟，进度条在这期间不动。
        # 后缀先说明原因，免得用户以为卡住了；第一步解码之后 step_progress 把它换成 tok/s。
        bar.set_postfix_str("first batch: compiling the decode step, 1-3 min on a GPU")
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
                new = finish(sub, result) if result is not None else []
            except torch.OutOfMemoryError as exc:
                result, oom = None, str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
            if result is None:
                # 在 except 块之外清理：异常的 traceback 引用着出错帧里的张量，块结束后才会释放。
                attempted = decoder.batch_size if decoder is not None else len(sub)
                decoder = None
                _free_memory(compiled=fast and compile)
                if attempted == 1:
                    raise RunError(
                        f"question {questions[sub[0]].index} ({mode} arm) is still out of memory at batch size 1 ({oom}). "
                        "Lower --max-new-tokens, use --load-in-4bit, or use a GPU with more memory; "
                        "every question finished before is in predictions.jsonl.")
                size = max(1, attempted // 2)
                backoffs += 1
                if on_event is not None:
                    on_event({"event": "oom_backoff", "mode": mode, "batch_size_from": attempted,
                              "batch_size_to": size, "indices": sorted(questions[j].index for j in sub)})
                print(f"[evaluator] {mode}: out of memory, batch size {attempted} → {size}, retrying the same questions", flush=True)
                decoder = make_decoder(size)
                pending.insert(0, sub)
                continue
            decoded_tokens += sum(len(result.tokens[row]) for row, j in enumerate(sub)
                                  if questions[j].index not in done)
            if new and on_batch is not None:
                on_batch(new)
            done.update(r["index"] for r in new)
            records.extend(new)
            live["base"] += len(new)
            bar.update(live["base"] - bar.n)
        if should_stop is not None and b + 1 < len(plan) and should_stop():
            interrupted = True
            break
    bar.close()
    return ArmResult(mode=mode, records=sorted(records, key=lambda r: r["index"]),
                     seconds=time.perf_counter() - start, decoded_tokens=decoded_tokens, oom_backoffs=backoffs,
                     interrupted=interrupted, decode_path=decode_path)


def arm_timing(arm: ArmResult) -> dict[str, Any]:
    """本次会话的计时（metrics.json 里的 "timing"）：解码秒数、本次生成的 token 数、tokens/s。

    续跑时只统计续跑这一次；这些数字因机器负载而异，不参与“结果相同”的比较。
    """
    return {"seconds": round(arm.seconds, 3), "decoded_tokens": arm.decoded_tokens,
            "tokens_per_second": arm.decoded_tokens / arm.seconds if arm.seconds > 0 else None,
            "decode_path": arm.decode_path}


# ---------------------------------------------------------------------------
# 答案抽取第二阶段的前向：提示 + 生成 + cue，每个模型一次，只取最后位置
# ---------------------------------------------------------------------------

@torch.inference_mode()
def forced_letters(models: Sequence[PreTrainedModel], ids: Sequence[Sequence[Sequence[int]]], roles: Sequence[str],
                   forced: ForcedAnswer, *, vocab_size: int, steering: SteeringParams | None) -> list[str | None]:
    """第二阶段：ids[k][i] 是第 k 个模型（角色 roles[k]）第 i 行的 提示 + 生成 + cue（scoring.forced_row_ids）。
    每个模型对左填充的整批做一次完整前向（不复用解码时的 KV 缓存：简单、与解码路径无关；代价约等于再做一次
    prefill，只有第一阶段没读出答案的行付出），取最后位置的 logits (B, V)[:, :vocab_size]，交给
    scoring.forced_predictions：单模型臂直接取四个字母上的 argmax，融合臂按该臂的 SteeringParams 融合后取 argmax
    （与 --scoring letter 同一规则）。返回每行的字母；臂的第一个模型在该行的 logits 非有限时为 None。"""
    if len(models) != len(ids) or len(models) != len(roles) or len(models) not in (1, 3):
        raise ValueError("forced_letters needs one id list per model, and one model or (target, expert, base)")
    device = models[0].device
    z: dict[str, torch.Tensor] = {}
    for model, rows, role in zip(models, ids, roles):
        tokens, mask = left_pad(rows, 0, model.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=tokens, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        z[role] = out.logits[:, -1, :vocab_size].float().to(device)
    return forced_predictions(z, roles, steering if len(models) == 3 else None, forced.letter_ids)


def stage2_letters(models: dict[str, PreTrainedModel], role_prompts: dict[str, list[list[int]]], roles: Sequence[str],
                   positions: Sequence[int], tokens: Sequence[Sequence[int]], end_ids: Collection[int],
                   forced: ForcedAnswer, *, vocab_size: int, steering: SteeringParams | None) -> list[str | None]:
    """一组行的第二阶段字母（run_arm 写记录与 main.check_stage2 续跑时重算共用这一条路径）：positions[i] 是题目位置 j，
    tokens[i] 是它生成的 id；每个角色的输入 = 该角色的提示 + 生成（去掉末尾的结束记号）+ cue，一起做一批 forced_letters。"""
    ids = [[forced_row_ids(role_prompts[r][j], t, end_ids, forced) for j, t in zip(positions, tokens)] for r in roles]
    return forced_letters([models[r] for r in roles], ids, roles, forced, vocab_size=vocab_size, steering=steering)


def recheck_stage2(mode: str, questions: Sequence[Any], role_prompts: dict[str, list[list[int]]],
                   models: dict[str, PreTrainedModel], records: Sequence[Record], *, roles: Sequence[str],
                   steering: SteeringParams | None, vocab_size: int, batch_size: int, end_ids: Sequence[int],
                   forced: ForcedAnswer) -> list[tuple[Record, str | None]]:
    """续跑：用模型重算一个臂已保存的第二阶段字母（records 里 pred_forced 非 null 的记录，由 output_ids 重算），
    返回 [(记录, 重算的字母)] 中不一致的那些。批的组成与 run_arm 相同：batch_plan 的每一批里需要第二阶段的行一起做
    一次 stage2_letters——不中断、没有显存回退的运行因此得到相同的填充与批形状，fp32 下逐位相同。
    （显存回退或被杀在写入中途的批，当初的组成不同，近似平局时理论上可能翻转；见 RELIABILITY.md。）"""
    steer = steering if len(roles) == 3 else None
    mine = {r["index"]: r for r in records if r["mode"] == mode and r.get("pred_forced") is not None}
    bad: list[tuple[Record, str | None]] = []
    for chunk in batch_plan(role_prompts["target"], batch_size):
        rows = [j for j in chunk if questions[j].index in mine]
        if not rows:
            continue
        recs = [mine[questions[j].index] for j in rows]
        letters = stage2_letters(models, role_prompts, roles, rows, [r["output_ids"] for r in recs], end_ids, forced,
                                 vocab_size=vocab_size, steering=steer)
        bad += [(rec, letter) for rec, letter in zip(recs, letters) if letter != rec["pred_forced"]]
    return bad


# ---------------------------------------------------------------------------
# 字母打分的前向：每题每模型一次前向，只取答案位置
# ---------------------------------------------------------------------------

@torch.inference_mode()
def score_letters(models: dict[str, PreTrainedModel],
                  prompt_ids: Sequence[Sequence[int]] | dict[str, Sequence[Sequence[int]]], letter_ids: list[int],
                  *, vocab_size: int, batch_size: int, metric: str = "js") -> LetterScores:
    """每个模型对每道题做一次前向（左填充成批，只算最后位置的 logits），收集字母 logits 与距离。

    prompt_ids: 每题的 id 列表——三个角色共用一份，或 {角色: 各自的一份}（角色有自己的系统提示时，
    见 scoring.letter_role_text）。返回的数组都在 CPU 上，按题目顺序排列；nonfinite[角色] 标出该角色整行 logits
    非有限的题（scoring.letter_records 把臂的第一个模型非有限的题记为无答案、计数）。
    """
    per_role = prompt_ids if isinstance(prompt_ids, dict) else {role: prompt_ids for role in models}
    n = len(next(iter(per_role.values())))
    letters: dict[str, list[torch.Tensor]] = {role: [] for role in models}
    bad: dict[str, list[torch.Tensor]] = {role: [] for role in models}  # 每批 (B,) bool：整行 logits 非有限
    dists: list[torch.Tensor] = []
    index = torch.tensor(letter_ids)
    for lo in range(0, n, batch_size):
        z = {}
        for role, model in models.items():
            ids, mask = left_pad(per_role[role][lo:lo + batch_size], 0, model.device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
            z[role] = out.logits[:, -1, :vocab_size].float()
            letters[role].append(z[role][:, index.to(z[role].device)].cpu())
            bad[role].append(nonfinite_rows(z[role]).cpu())
        if "expert" in z:
            dists.append(distance(z["target"], z["expert"], metric).cpu())
    return LetterScores(letters={r: torch.cat(v) for r, v in letters.items()},
                        distance=torch.cat(dists) if dists else None, nonfinite={r: torch.cat(v) for r, v in bad.items()})


def score_letters_shard(models: dict[str, PreTrainedModel], prompt_ids: dict[str, list[list[int]]],
                        letter_ids: list[int], *, vocab_size: int, batch_size: int, metric: str,
                        shard: tuple[int, int] = (0, 1),
                        progress: bool = False) -> list[tuple[list[int], LetterScores]]:
    """字母打分按 batch_plan 的批分给各进程（与 CoT 相同的划分，批的组成与单进程一样，结果逐位相同）：
    返回本进程 (rank, world) 的 [(该批的题目位置, 该批的 LetterScores)]；scoring.merge_letter_scores 按题目顺序拼回。
    prompt_ids[角色][j]：第 j 题在该角色下的 id。progress：显示本进程的进度条（每批前向之后推进）。"""
    from tqdm.auto import tqdm

    rank, world = shard
    chunks = [chunk for b, chunk in enumerate(batch_plan(prompt_ids["target"], batch_size)) if b % world == rank]
    mine = []
    with tqdm(total=sum(len(c) for c in chunks), desc="letter scoring", unit="q", disable=not progress) as bar:
        for chunk in chunks:
            part = score_letters(models, {r: [prompt_ids[r][j] for j in chunk] for r in models}, letter_ids,
                                 vocab_size=vocab_size, batch_size=len(chunk), metric=metric)
            mine.append((chunk, part))
            bar.update(len(chunk))
    return mine
