"""steering_utils 采样原语的单元测试：计数器式哈希随机数、top-p 截断与 Gumbel-max 抽样。

全部在 CPU 上、用确定的输入（固定种子的张量与由 sampling_keys 生成的 key）运行，所以统计检验
（KS、卡方）的结果每次都相同、不会偶发失败。每个测试断言一条具体性质：与独立的纯 Python 哈希逐位一致、
只依赖 (key, token id)、逐行独立、频率与 softmax / nucleus 分布一致、与逐行参考实现一致、输入不被修改、
参数校验、torch.compile(fullgraph=True) 与 eager 一致。
"""
from __future__ import annotations

import math
import struct

import pytest
import torch
from scipy import stats
from torch import Tensor

import sampling
from sampling import counter_uniform, sample_tokens, sampling_keys, top_p_filter

M32: int = 0xFFFFFFFF


def _gen(seed: int) -> torch.Generator:
    """固定种子的独立随机数发生器，避免测试之间通过全局 RNG 相互影响。"""
    return torch.Generator().manual_seed(seed)


def _logits(b: int, v: int, seed: int, scale: float = 3.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """形状 (b, v) 的随机 logits；scale 控制分布的尖锐程度。"""
    return (torch.randn(b, v, generator=_gen(seed)) * scale).to(dtype)


def _masked(x: Tensor, frac: float, seed: int) -> Tensor:
    """约 frac 比例的位置置为 −inf（模拟可行性约束屏蔽的词），但每行的最大值保持有限。"""
    mask = torch.rand(x.shape, generator=_gen(seed)) < frac
    mask &= x != x.amax(-1, keepdim=True)
    return x.masked_fill(mask, float("-inf"))


def _ref_murmur3(data: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32 的独立纯 Python 实现（无界整数，按定义逐字节块处理；只支持长度为 4 的倍数）。"""
    assert len(data) % 4 == 0

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & M32

    h = seed & M32
    for (k,) in struct.iter_unpack("<I", data):
        k = rotl((k * 0xCC9E2D51) & M32, 15) * 0x1B873593 & M32
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & M32
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _ref_key(seed: int, qid: int, chain: int, step: int) -> int:
    """sampling_keys 文档中的定义：murmur3 作用于 (seed, chain, step, qid) 的小端 64 位补码。"""
    return _ref_murmur3(struct.pack("<QQQq", seed, chain, step, qid))


def _keys(n: int, seed: int = 0, chain: int = 0, step: int = 0) -> Tensor:
    """n 个确定的 key：题目 index 0..n−1。"""
    return sampling_keys(seed, torch.arange(n), chain, step)


# ---------------------------------------------------------------------------
# 哈希：与标准 MurmurHash3_x86_32 及纯 Python 参考逐位一致（也就证明了 int64 实现没有溢出）
# ---------------------------------------------------------------------------

# 公开的 MurmurHash3_x86_32 测试向量（SMHasher 及各语言移植的测试集）：(数据, 种子, 哈希)。
KNOWN_VECTORS: list[tuple[bytes, int, int]] = [
    (b"", 0, 0),
    (b"", 1, 0x514E28B7),
    (b"", 0xFFFFFFFF, 0x81F16F39),
    (b"test", 0, 0xBA6BD213),
    (b"aaaa", 0x9747B28C, 0x5A97808A),
    (b"\xff\xff\xff\xff", 0, 0x76293B50),
    (b"\x21\x43\x65\x87", 0, 0xF55B516B),
    (b"\x21\x43\x65\x87", 0x5082EDEE, 0x2362F9DE),
]


@pytest.mark.parametrize(("data", "seed", "expected"), KNOWN_VECTORS)
def test_murmur3_known_vectors(data: bytes, seed: int, expected: int) -> None:
    words = [w for (w,) in struct.iter_unpack("<I", data)]
    assert _ref_murmur3(data, seed) == expected
    assert sampling._murmur3_words(list(words), seed) == expected  # Python int 路径
    tensor_words = [torch.tensor([w], dtype=torch.int64) for w in words]
    if tensor_words:  # int64 张量路径
        assert sampling._murmur3_words(tensor_words, seed).tolist() == [expected]  # type: ignore[union-attr]


def test_sampling_keys_match_python_reference_on_extreme_values() -> None:
    """任意 int64 的题目 index（含 −1、±2^63 边界）与很大的 seed / chain / step：与无界整数参考逐位相同。"""
    qids = [-1, 0, 1, 2, 12345, 2**31, 2**32 - 1, 2**32, 2**62 + 7, 2**63 - 1, -(2**63), -2]
    q = torch.tensor(qids, dtype=torch.int64)
    for seed, chain, step in [(0, 0, 0), (42, 3, 17), (2**63 - 1, 2**40 + 5, 2**33 + 1), (M32, M32, M32)]:
        keys = sampling_keys(seed, q, chain, step)
        assert keys.dtype == torch.int64 and keys.shape == (len(qids),)
        assert keys.tolist() == [_ref_key(seed, qid, chain, step) for qid in qids]


def test_counter_uniform_matches_python_reference() -> None:
    keys = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, M32, 123456789], dtype=torch.int64)
    vocab = 300
    u = counter_uniform(keys, vocab)
    want = [
        [((_ref_murmur3(struct.pack("<II", k, v)) >> 9) + 0.5) / 2**23 for v in range(vocab)] for k in keys.tolist()
    ]
    assert torch.equal(u.double(), torch.tensor(want, dtype=torch.float64))


# ---------------------------------------------------------------------------
# sampling_keys：取值、dtype、设备，step 为 int 与张量一致，不同字段给出不同的流
# ---------------------------------------------------------------------------


def test_sampling_keys_range_and_step_forms() -> None:
    q = torch.tensor([-1, 0, 5, 5, 1000])
    keys = sampling_keys(7, q, 1, 3)
    assert keys.dtype == torch.int64 and keys.device == q.device and keys.shape == (5,)
    assert ((keys >= 0) & (keys <= M32)).all()
    assert keys[2] == keys[3]  # 只取决于题目 index，不取决于行号
    for step in (torch.tensor(3), torch.tensor(3, dtype=torch.int32)):
        assert torch.equal(sampling_keys(7, q, 1, step), keys)  # 0-d 张量与 Python int 逐位相同
    assert torch.equal(sampling_keys(7, q.to(torch.int32), 1, 3), keys)  # int32 的题目 index 同样处理
    assert sampling_keys(7, torch.zeros(0, dtype=torch.int64), 1, 3).shape == (0,)


def test_different_fields_give_different_streams() -> None:
    n, vocab = 256, 64
    base_args = {"seed": 1, "chain": 0, "step": 0}
    base_keys = _keys(n, **base_args)
    base_u = counter_uniform(base_keys, vocab)
    assert base_keys.unique().numel() == n  # 不同题目的 key 互不相同
    for field, value in [("seed", 2), ("chain", 1), ("step", 1)]:
        args = {**base_args, field: value}
        keys = _keys(n, **args)
        assert (keys != base_keys).all(), field
        u = counter_uniform(keys, vocab)
        # 独立的流：几乎每个位置的均匀数都不同（23 位网格上碰巧相等的概率 ~1e-7）
        assert (u != base_u).float().mean() > 0.999, field
    # 题目 index 之间：相邻两题的整行均匀数也不相同
    assert (base_u[1:] != base_u[:-1]).float().mean() > 0.999


# ---------------------------------------------------------------------------
# counter_uniform：取值、均匀性、独立性，只依赖 (key, token id)
# ---------------------------------------------------------------------------


def test_counter_uniform_values_dtype_shape() -> None:
    keys = _keys(16, seed=3)
    u = counter_uniform(keys, 1000)
    assert u.dtype == torch.float32 and u.shape == (16, 1000) and u.device == keys.device
    assert ((u > 0) & (u < 1)).all()
    # 每个值都是 23 位网格的中点 (m + ½)/2^23：u·2^24 是奇数（说明 float32 计算是精确的）
    scaled = u.double() * 2**24
    assert torch.equal(scaled, scaled.round()) and (scaled.long() % 2 == 1).all()


def test_counter_uniform_is_uniform_ks() -> None:
    """64 × 4096 个值的 KS 检验（确定的 key，结果固定），以及逐列、相邻 token 间没有明显相关。"""
    u = counter_uniform(_keys(64, seed=11), 4096).double()
    assert stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3
    # 同一个 token id 在不同 key 之间（单列，4096 个 key）也是均匀的
    col = counter_uniform(_keys(4096, seed=12), 3)[:, 1].double()
    assert stats.kstest(col.numpy(), "uniform").pvalue > 1e-3
    # 相邻 token 的均匀数不相关：n ≈ 2.6e5 时相关系数的标准差约 0.002
    a, b = u[:, :-1].flatten(), u[:, 1:].flatten()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(r) < 0.01
    assert abs(u.mean().item() - 0.5) < 0.005


def test_counter_uniform_depends_only_on_key_and_token() -> None:
    keys = _keys(10, seed=5)
    full = counter_uniform(keys, 200)
    perm = torch.randperm(10, generator=_gen(0))
    assert torch.equal(counter_uniform(keys[perm], 200), full[perm])  # 换行
    assert torch.equal(counter_uniform(keys[3:4], 200), full[3:4])  # 单独一行
    assert torch.equal(counter_uniform(keys, 50), full[:, :50])  # 词表更短：前缀相同
    assert torch.equal(counter_uniform(keys.to(torch.int32), 200), full)  # key 的整数类型无关


# ---------------------------------------------------------------------------
# top_p_filter
# ---------------------------------------------------------------------------


def _ref_top_p(row: Tensor, top_p: float) -> tuple[Tensor, bool]:
    """逐行参考实现（float64）：按概率降序累加，第一次累计 ≥ top_p 的位置给出阈值 τ；保留 logit ≥ τ 的所有词。

    返回 (保留掩码 (V,), 是否"确定")：有某个累计概率与 top_p 相差 < 1e-5 的行，在 float32 下可能落在另一侧，
    标为不确定（由调用方跳过）。
    """
    z = row.double()
    p_sorted, order = torch.softmax(z, -1).sort(descending=True)
    cum = p_sorted.cumsum(-1)
    decided = bool(((cum - top_p).abs() > 1e-5).all())
    reached = (cum >= top_p).nonzero()
    tau = z[order[reached[0, 0]]].item() if reached.numel() else -math.inf  # 舍入使总和 < top_p：全部保留
    return z >= tau, decided


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999])
def test_top_p_matches_reference(top_p: float) -> None:
    n_decided = 0
    for scale, seed in [(0.5, 0), (2.0, 1), (6.0, 2)]:
        z = _masked(_logits(24, 60, seed, scale=scale), 0.2, seed + 100)
        out = top_p_filter(z, top_p)
        for b in range(z.shape[0]):
            keep, decided = _ref_top_p(z[b], top_p)
            if not decided:
                continue
            n_decided += 1
            assert torch.equal(out[b].isfinite(), keep & z[b].isfinite()), (scale, b)
            assert torch.equal(out[b][keep], z[b][keep])
    assert n_decided >= 0.9 * 72


def test_top_p_large_vocab_matches_reference() -> None:
    """V > 1024 走两级累加和（_blocked_cumsum）：结果仍与 float64 参考一致。"""
    z = _masked(_logits(6, 5000, 30, scale=4.0), 0.2, 31)
    n_decided = 0
    for top_p in (0.1, 0.5, 0.9, 0.99):
        out = top_p_filter(z, top_p)
        for b in range(z.shape[0]):
            keep, decided = _ref_top_p(z[b], top_p)
            if decided:
                n_decided += 1
                assert torch.equal(out[b].isfinite(), keep & z[b].isfinite())
    assert n_decided >= 20


@pytest.mark.parametrize("vocab", [1, 7, 1024, 1025, 3 * 1024 + 5, 5000])
def test_blocked_cumsum_matches_cumsum(vocab: int) -> None:
    x = torch.rand(3, vocab, generator=_gen(32)) / vocab
    got = sampling._blocked_cumsum(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert (got.double() - x.double().cumsum(-1)).abs().max() < 1e-6
    assert (got[:, 1:] >= got[:, :-1]).all()


def test_top_p_is_minimal_nucleus() -> None:
    """保留的质量 ≥ top_p，且去掉保留集中最小的 logit（无并列时）后质量 < top_p：即最小集合。"""
    z = _logits(32, 100, 3, scale=2.0)  # 连续随机值，没有并列
    for top_p in (0.2, 0.6, 0.9):
        out = top_p_filter(z, top_p)
        p = torch.softmax(z.double(), -1)
        kept = out.isfinite()
        mass = (p * kept).sum(-1)
        smallest = torch.where(kept, p, torch.inf).amin(-1)
        assert (mass >= top_p - 1e-6).all() and (mass - smallest < top_p + 1e-6).all()


def test_top_p_keeps_argmax_and_is_monotone() -> None:
    z = _masked(_logits(16, 80, 4, scale=5.0), 0.3, 5)
    top = z.argmax(-1, keepdim=True)
    previous = None
    for top_p in (1e-6, 0.1, 0.5, 0.9, 0.99, 1.0):
        kept = top_p_filter(z, top_p).isfinite()
        assert kept.gather(-1, top).all()
        if previous is not None:
            assert not (previous & ~kept).any()  # top_p 越大，nucleus 越大（嵌套）
        previous = kept
    # 极小的 top_p：只剩 argmax（随机值无并列）
    assert torch.equal(top_p_filter(z, 1e-6).isfinite().sum(-1), torch.ones(16, dtype=torch.long))


def test_top_p_one_is_identity_on_finite_logits() -> None:
    z = _masked(_logits(8, 50, 6), 0.2, 7)
    z[:, 0] = -300.0  # 概率 ~1e-130：float32 累加和早已是 1.0，走累加路径会把它截掉
    out = top_p_filter(z, 1.0)
    assert torch.equal(out, z) and out.dtype == torch.float32
    assert out.data_ptr() != z.data_ptr()  # 新张量
    assert torch.equal(top_p_filter(z, 1), z)


def test_top_p_boundary_ties_are_all_kept() -> None:
    ninf = float("-inf")
    # p ≈ [0.50, 0.18, 0.18, 0.18, 0.07]：top_p = 0.6 的最小集合是 {0, 任一并列词}，按规则三个并列词全部保留
    z = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0], [1.0, 2.0, 1.0, ninf, 1.0], [3.0, 0.0, 3.0, -1.0, ninf]])
    out = top_p_filter(z, 0.6)
    assert out.isfinite().tolist() == [
        [True, True, True, True, False],
        [True, True, True, False, True],
        [True, False, True, False, False],  # 并列的 argmax 都保留
    ]
    # 结果与词表顺序无关：把列倒过来，保留的仍是同一批词
    assert torch.equal(top_p_filter(z.flip(-1), 0.6).flip(-1), out)


def test_top_p_existing_neg_inf_and_rows_independent() -> None:
    z = _masked(_logits(12, 40, 8), 0.5, 9)
    z[0, 1:] = float("-inf")  # 只剩一个有限值的行
    for top_p in (0.3, 0.9, 1.0):
        out = top_p_filter(z, top_p)
        assert not out.isnan().any()
        assert out[z.isneginf()].isneginf().all()  # 已屏蔽的词不会复活
        assert out[0, 0] == z[0, 0] and (out.isfinite().sum(-1) >= 1).all()
        perm = torch.randperm(12, generator=_gen(10))
        assert torch.equal(top_p_filter(z[perm], top_p), out[perm])
        assert torch.equal(top_p_filter(z[5:6], top_p), out[5:6])


# ---------------------------------------------------------------------------
# sample_tokens：频率、逐行独立、确定性
# ---------------------------------------------------------------------------

SMALL_LOGITS: Tensor = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.3, 0.7])


def _chi_square_p(tokens: Tensor, probs: Tensor) -> float:
    """样本 tokens 与分布 probs（float64，(V,)）的卡方拟合优度 p 值；只比较 probs > 0 的类别。"""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0  # 概率为 0 的词一次也没有被抽到
    expected = probs[support] * tokens.numel()
    assert (expected >= 5).all()
    return float(stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_sample_frequencies_match_softmax(temperature: float) -> None:
    n = 20000
    logits = SMALL_LOGITS.clone()
    logits[5] = float("-inf")  # 屏蔽的词永远不会被抽到
    keys = sampling_keys(2024, torch.arange(n), 0, 0)
    tokens = sample_tokens(logits.expand(n, -1), keys, temperature)
    assert tokens.dtype == torch.int64 and tokens.shape == (n,)
    probs = torch.softmax(logits.double() / temperature, -1)
    assert _chi_square_p(tokens, probs) > 1e-3
    # 反面检验：同一批样本与"未做温度缩放"的分布明显不符（说明检验有区分力）
    if temperature != 1.0:
        assert _chi_square_p(tokens, torch.softmax(logits.double(), -1)) < 1e-6


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.5), (1.0, 0.8), (0.7, 0.9), (1.5, 0.6)])
def test_sample_frequencies_match_renormalized_nucleus(temperature: float, top_p: float) -> None:
    n = 20000
    keys = sampling_keys(77, torch.arange(n), 1, 5)
    tokens = sample_tokens(SMALL_LOGITS.expand(n, -1), keys, temperature, top_p)
    z = SMALL_LOGITS.double() / temperature
    keep, decided = _ref_top_p(z, top_p)
    assert decided
    assert 1 < keep.sum() < SMALL_LOGITS.numel()  # 确实截掉了一部分，也保留了不止一个
    probs = torch.softmax(z.masked_fill(~keep, -math.inf), -1)  # nucleus 内重新归一化
    assert _chi_square_p(tokens, probs) > 1e-3  # 也断言 nucleus 外的词从未出现


def test_sample_is_deterministic_and_row_independent() -> None:
    z = _masked(_logits(10, 500, 12, scale=2.0), 0.2, 13)
    q = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79, -1, -1])
    keys = sampling_keys(9, q, 2, 41)
    for temperature, top_p in [(1.0, 1.0), (0.8, 0.9), (2.0, 0.5)]:
        full = sample_tokens(z, keys, temperature, top_p)
        assert torch.equal(sample_tokens(z.clone(), keys.clone(), temperature, top_p), full)
        assert z.gather(-1, full[:, None]).isfinite().all()  # 永远不抽到 −inf 的词
        # 换行：每行跟着它自己的 (logits, key) 走
        perm = torch.randperm(10, generator=_gen(14))
        assert torch.equal(sample_tokens(z[perm], keys[perm], temperature, top_p), full[perm])
        # 单独一行、不同批大小
        for i in range(10):
            assert sample_tokens(z[i:i + 1], keys[i:i + 1], temperature, top_p).item() == full[i].item()
        assert torch.equal(sample_tokens(z[2:7], keys[2:7], temperature, top_p), full[2:7])
        # 改变其他行的 logits 与 key 不影响第 0 行
        other = _logits(10, 500, 15)
        other[0] = z[0]
        other_keys = keys.clone()
        other_keys[1:] = sampling_keys(1, torch.arange(9), 0, 0)
        assert sample_tokens(other, other_keys, temperature, top_p)[0] == full[0]
        # 同一道题在另一个批、另一行：用题目 index 生成 key，结果相同
        moved = sample_tokens(torch.cat([other[:4], z[3:4]]), sampling_keys(9, torch.tensor([0, 1, 2, 3, 92]), 2, 41),
                              temperature, top_p)
        assert moved[-1] == full[3]


def test_sample_streams_vary_with_step_and_key() -> None:
    """同一行 logits：不同 step / chain 抽到的 token 序列不同，且不是总等于 argmax。"""
    z = _logits(1, 50, 16, scale=0.5).expand(64, -1)  # 接近均匀的分布
    by_step = [sample_tokens(z[:1], sampling_keys(0, torch.tensor([0]), 0, s), 1.0).item() for s in range(64)]
    by_chain = [sample_tokens(z[:1], sampling_keys(0, torch.tensor([0]), c, 0), 1.0).item() for c in range(64)]
    assert len(set(by_step)) > 20 and len(set(by_chain)) > 20 and by_step != by_chain


def test_tiny_and_huge_temperature() -> None:
    z = _masked(_logits(16, 100, 17), 0.2, 18)
    keys = _keys(16)
    # T → 0：退化为 argmax（随机值无并列），logits/T 不会上溢成 +inf 而产生 NaN
    assert torch.equal(sample_tokens(z, keys, 1e-30), z.argmax(-1))
    assert torch.equal(sample_tokens(z, keys, 1e-30, top_p=0.5), z.argmax(-1))
    # T 很大：近似均匀，但屏蔽的词依旧不会被抽到
    big = sample_tokens(z, keys, 1e30)
    assert z.gather(-1, big[:, None]).isfinite().all()


# ---------------------------------------------------------------------------
# 精度、纯函数性
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_inputs_unchanged_and_output_dtypes(dtype: torch.dtype) -> None:
    z = _masked(_logits(6, 40, 19, dtype=dtype), 0.2, 20)
    q = torch.tensor([0, 1, 2, 3, 4, -1])
    step = torch.tensor(4)
    keys = sampling_keys(3, q, 0, step)
    snapshot = [z.clone(), q.clone(), step.clone(), keys.clone()]
    filtered = top_p_filter(z, 0.7)
    tokens = sample_tokens(z, keys, 0.9, 0.7)
    counter_uniform(keys, 40)
    for before, after in zip(snapshot, (z, q, step, keys)):
        assert torch.equal(before, after) and before.dtype == after.dtype
    assert filtered.dtype == torch.float32 and not filtered.isnan().any()
    assert tokens.dtype == torch.int64
    # 低精度输入在 float32 下计算：与"同值的 float32 输入"逐位相同
    assert torch.equal(filtered, top_p_filter(z.float(), 0.7))
    assert torch.equal(tokens, sample_tokens(z.float(), keys, 0.9, 0.7))


# ---------------------------------------------------------------------------
# 参数校验
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0, -0.5, float("nan"), float("inf"), True, "1.0"])
def test_bad_temperature_mentions_greedy(temperature: object) -> None:
    z = _logits(2, 5, 21)
    with pytest.raises(ValueError, match="temperature.*argmax"):
        sample_tokens(z, _keys(2), temperature)  # type: ignore[arg-type]


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, float("nan"), float("inf"), True])
def test_bad_top_p(top_p: object) -> None:
    z = _logits(2, 5, 22)
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(z, top_p)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(z, _keys(2), 1.0, top_p)  # type: ignore[arg-type]


def test_bad_key_arguments() -> None:
    q = torch.arange(3)
    for kwargs, pattern in [
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"chain": -2}, "chain"),
        ({"step": -1}, "step"),
        ({"step": 2.0}, "step"),
        ({"step": torch.tensor([1, 2])}, r"step.*\(2,\)"),
        ({"step": torch.tensor(1.0)}, "step.*float"),
        ({"question_ids": q[None]}, r"question_ids.*\(1, 3\)"),
        ({"question_ids": q.float()}, "question_ids.*float"),
    ]:
        args = {"seed": 0, "question_ids": q, "chain": 0, "step": 0, **kwargs}
        with pytest.raises(ValueError, match=pattern):
            sampling_keys(**args)  # type: ignore[arg-type]


def test_bad_shapes_and_vocab() -> None:
    z, keys = _logits(3, 5, 23), _keys(3)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        sample_tokens(z, keys[:2], 1.0)  # key 数与行数不符
    with pytest.raises(ValueError, match=r"\(5,\)"):
        sample_tokens(z[0], keys, 1.0)  # 1-D logits
    with pytest.raises(ValueError, match=r"\(5,\)"):
        top_p_filter(z[0], 0.5)
    with pytest.raises(ValueError, match="keys"):
        counter_uniform(keys.float(), 5)
    with pytest.raises(ValueError, match="keys"):
        counter_uniform(keys[None], 5)
    for vocab in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="vocab"):
            counter_uniform(keys, vocab)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# torch.compile(fullgraph=True) 与 eager 一致；CUDA 与 CPU 一致
# ---------------------------------------------------------------------------


def _decode_step(logits: Tensor, question_ids: Tensor, step: Tensor) -> Tensor:
    """模拟 FastDecoder 编译步里的调用：step 是 0-d 张量，seed/chain/温度/top_p 是 Python 常数。"""
    keys = sampling_keys(1234, question_ids, 3, step)
    return sample_tokens(logits, keys, 0.8, 0.9)


def test_compile_fullgraph_matches_eager() -> None:
    """fullgraph=True：整段没有图中断（无 .item()、无依赖张量取值的 Python 分支、无数据相关形状）；
    step 作为张量每步变化也不触发重新编译。用 aot_eager 后端保持 CPU 测试快速（inductor 在 CPU 上首次编译
    需要 20–40 s；GPU 上的 inductor 见 test_cuda_matches_cpu）。"""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_decode_step, backend=counter, fullgraph=True)
    z = _masked(_logits(6, 300, 24, scale=2.0), 0.2, 25)
    q = torch.tensor([5, -1, 0, 7, 100, 3])
    for step in range(4):
        s = torch.tensor(step)
        assert torch.equal(compiled(z, q, s), _decode_step(z, q, s))
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="需要 CUDA")
def test_cuda_matches_cpu() -> None:
    """CUDA 上的 key 与均匀数与 CPU 逐位相同；抽到的 token 相同；inductor 编译的 CUDA 步与 eager 相同。

    词表取 128256（Llama 3 的大小）：inductor 在这么长的扫描维上会拆分 cumsum，正是 _blocked_cumsum 要避开的情形。
    """
    q = torch.tensor([5, -1, 0, 7, 100, 3, 2**40, -(2**63)])
    vocab = 128256
    z = _masked(_logits(8, vocab, 26, scale=2.0), 0.2, 27)
    for step in (0, 1, 2**35):
        keys_cpu = sampling_keys(99, q, 1, step)
        keys_cuda = sampling_keys(99, q.cuda(), 1, torch.tensor(step, device="cuda"))
        assert keys_cuda.is_cuda and torch.equal(keys_cuda.cpu(), keys_cpu)
        assert torch.equal(counter_uniform(keys_cuda, vocab).cpu(), counter_uniform(keys_cpu, vocab))
        for temperature, top_p in [(1.0, 1.0), (0.7, 0.9)]:
            assert torch.equal(sample_tokens(z.cuda(), keys_cuda, temperature, top_p).cpu(),
                               sample_tokens(z, keys_cpu, temperature, top_p))
    torch._dynamo.reset()
    compiled = torch.compile(_decode_step, fullgraph=True)
    zc, qc = z.cuda(), q.cuda()
    for step in range(3):
        s = torch.tensor(step, device="cuda")
        assert torch.equal(compiled(zc, qc, s), _decode_step(zc, qc, s))
        assert torch.equal(compiled(zc, qc, s).cpu(), _decode_step(z, q, torch.tensor(step)))
    torch._dynamo.reset()
