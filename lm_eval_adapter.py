"""把领域引导的三模型放进 lm-evaluation-harness（lm-eval 0.4.13）：一个 `LM` 实现，注册名 "domain-steered"。

    loglikelihood          每个续写 token 的融合对数概率之和：log_softmax(z_t + α·(z_e − z_b))，α 由该位置自己的
                           目标–专家距离算出（evaluator.fuse_step → steering_utils，不另写一份公式）；
                           is_greedy = 每个续写 token 都是该位置融合 logits 的 argmax。
    loglikelihood_rolling  同一规则，按 lm-eval 的滚动窗口（lm_eval.utils.get_rolling_token_windows）求和。
    generate_until         走项目自己的解码器（FastDecoder，或 --no-fast 时的参考循环 generate_batch），
                           文本在第一个 until 字符串处截断，最多 max_gen_toks 个新 token。
基线就是同一个类、steering=None（只用目标模型）。

提示规则与 `main.py --scoring letter` 相同（交叉核对见 tests/test_lm_eval.py）：
- 特殊记号默认按分词器的习惯（add_bos_token=None），与 lm-eval 自带的 `hf` 模型、与字母打分都一致：
  Llama-3 的分词器会加 <|begin_of_text|>，SmolLM2 的不加。add_bos_token=True/False 强制加或不加。
- 目标模型只看 lm-eval 给的上下文；专家/基座若另设了系统提示（--expert-system-prompt / --base-system-prompt，
  例如 --demo 用同一个小模型扮演两者），把它作为纯文本前缀 "提示\\n\\n" 放在上下文之前（与 scoring.letter_role_text 相同）。

lm-eval 只在本模块与 eval.py 里导入：主程序不依赖它。
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # 只有用到 lm-eval 的入口才会走到这里
    raise ImportError("lm-eval is not installed. Install it with: pip install lm-eval==0.4.13 "
                      "(pinned in requirements.txt); the rest of the tool works without it.") from exc

# --- 项目内的名字：集中在这一处，代码重组时只改这里 ---------------------------------------------
from config import ROLES, Config, parse_args
from evaluator import generate_batch, left_pad
from sampling import Sampling
from steering_utils import SteeringParams, fuse_step, steering_params
from scoring import role_prefix
from model_loader import end_token_ids, load_models, load_tokenizer, resolve_device

MODEL_NAME: str = "domain-steered"  # lm-eval 注册名（别名 "steered-llama"）
DEFAULT_MAX_LENGTH: int = 2048  # 模型配置里没有 max_position_embeddings 时的上下文上限（与 lm-eval 的 HFLM 相同）
FUSE_CHUNK: int = 512  # 一次融合多少个位置：滚动窗口可达上千个位置 × 12.8 万词表，分块避免一次占满内存


def role_prefixes(cfg: Config) -> dict[str, str]:
    """每个角色放在上下文前的纯文本前缀：与字母打分同一条规则（scoring.role_prefix）。"""
    return {role: role_prefix(cfg, role) for role in ROLES}


def fused_log_probs(z: Sequence[torch.Tensor], steering: SteeringParams | None) -> torch.Tensor:
    """一组位置的融合对数概率 (P, V) float32。z = [z_t] 或 [z_t, z_e, z_b]，每个 (P, V)，每一行是一个位置。

    每行独立地经 fuse_step（α 按该行自己的距离、可选可信度约束、非有限守卫）；基线（steering=None）即 z_t。
    按 FUSE_CHUNK 行分块，只为控制峰值内存，结果与一次算完逐位相同（每行的计算与其他行无关）。
    """
    out = []
    for lo in range(0, z[0].shape[0], FUSE_CHUNK):
        rows = [t[lo:lo + FUSE_CHUNK].float() for t in z]
        fused = rows[0] if steering is None else fuse_step(rows[0], rows[1], rows[2], steering)[0]
        out.append(F.log_softmax(fused, dim=-1))
    return torch.cat(out)


@register_model(MODEL_NAME, "steered-llama")
class SteeredLM(TemplateLM):
    """lm-eval 的 LM：目标单独（steering=None），或目标、专家、基座三个模型按 steering 融合。

    models: {角色: 模型}（基线只需 "target"）；tokenizer: 目标的分词器（三个角色共用词表，model_loader 已检查）；
    vocab_size: 融合用的词表大小（logits 切到 [:vocab_size]）；prefixes: 每个角色的纯文本前缀（role_prefixes）。
    batch_size: 每次前向的序列数；fast/compile: generate_until 走 FastDecoder（是否编译解码步）还是 generate_batch。
    """

    def __init__(self, models: dict[str, Any], tokenizer: Any, *, vocab_size: int,
                 steering: SteeringParams | None, prefixes: dict[str, str] | None = None, batch_size: int = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, fast: bool = True, compile: bool = False,
                 add_bos_token: bool | None = None, seed: int = 0, end_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        self.roles = ROLES if steering is not None else ("target",)
        missing = [r for r in self.roles if r not in models]
        if missing:
            raise ValueError(f"the steered model needs models for {', '.join(self.roles)}; "
                             f"missing: {', '.join(missing)}")
        if batch_size < 1 or max_gen_toks < 1:
            raise ValueError(f"batch_size={batch_size} and max_gen_toks={max_gen_toks} must be >= 1")
        self.models = {r: models[r] for r in self.roles}
        self.tokenizer = tokenizer
        self.vocab_size, self.steering = vocab_size, steering
        self.prefixes = {r: (prefixes or {}).get(r, "") for r in self.roles}
        if self.prefixes["target"]:
            raise ValueError("the target model sees the lm-eval context unchanged; a prefix is only for expert/base")
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.fast, self.compile, self.add_bos_token, self.seed = fast, compile, add_bos_token, seed
        cfg = self.models["target"].config
        self._max_length = max_length or getattr(cfg, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        self.end_ids = list(end_ids) if end_ids is not None else end_token_ids(tokenizer, list(self.models.values()))
        self._device = self.models["target"].device

    # ------------------------------------------------------------------ 构造
    @classmethod
    def from_config(cls, cfg: Config, arm: str, models: dict[str, Any] | None = None, tokenizer: Any = None,
                    vocab_size: int | None = None, **kwargs: Any) -> "SteeredLM":
        """按 main.py 的配置建一个臂：arm = "baseline"（目标单独）或 "steered"（配置里的调度、α、β）。
        models/tokenizer/vocab_size 给出时直接复用（eval.py 让两个臂共用一次加载），否则按 main.py 的方式加载。"""
        if arm not in ("baseline", "steered"):
            raise ValueError(f"arm={arm!r}: use 'baseline' or 'steered'")
        if models is None:
            tokenizer = load_tokenizer(cfg.target)
            models, vocab_size = load_models(cfg, tokenizer, resolve_device(cfg))
        device = next(iter(models.values())).device
        compile_step = cfg.fast and (cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"))
        options = dict(batch_size=cfg.batch_size, max_gen_toks=cfg.max_new_tokens, fast=cfg.fast,
                       compile=compile_step, seed=cfg.seed)
        options.update(kwargs)
        return cls(models, tokenizer, vocab_size=int(vocab_size), prefixes=role_prefixes(cfg),
                   steering=steering_params(cfg) if arm == "steered" else None, **options)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "SteeredLM":
        """`--model_args` 字符串 → 臂：键是 main.py 的参数名（下划线或短横线），外加 arm=baseline|steered、
        add_bos_token=true|false、max_length=N。例如 "demo=true,arm=steered,base_alpha=0.5"。batch_size 等来自 lm-eval 的
        additional_config 只在 model_args 里没有给出时采用。"""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "SteeredLM":
        """字典形式的 model_args（见 create_from_arg_string），经 config.parse_args 校验，默认值与 main.py 相同。"""
        args = {k.replace("-", "_"): v for k, v in arg_dict.items()}
        arm = str(args.pop("arm", "steered"))
        raw_bos = args.pop("add_bos_token", None)
        add_bos = None if raw_bos is None else str(raw_bos).lower() in ("1", "true", "yes")
        max_length = int(args.pop("max_length")) if args.get("max_length") is not None else None
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"}
        for k, v in extra.items():
            args.setdefault(k, v)
        argv: list[str] = []
        for k, v in args.items():
            flag = "--" + k.replace("_", "-")
            if isinstance(v, bool) or str(v).lower() in ("true", "false"):
                argv.append(flag if str(v).lower() == "true" else "--no-" + k.replace("_", "-"))
            else:
                argv += [flag, str(v)]
        cfg, _ = parse_args(argv)
        # 基线只加载目标模型（model_loader.load_models 按 modes 决定加载哪些角色）
        cfg = _with_modes(cfg, ("baseline", "steered") if arm == "steered" else ("baseline",))
        return cls.from_config(cfg, arm, add_bos_token=add_bos, max_length=max_length)

    # ------------------------------------------------------------------ lm-eval 需要的属性
    @property
    def eot_token_id(self) -> int:
        """结束记号：分词器的 eos（lm-eval 用它作 generate_until 的默认停止串）。"""
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """空上下文与滚动窗口的首个条件记号：bos，没有则 eos（与 lm-eval 的 HFLM 相同）。"""
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        """一次前向的最长序列：更长的输入从左边截断（与 HFLM 相同）。"""
        return int(self._max_length)

    @property
    def tokenizer_name(self) -> str:
        """lm-eval 用它给请求缓存做指纹（聊天模板时需要）。"""
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """--apply_chat_template 时用目标分词器的模板渲染（专家/基座的前缀仍按纯文本加在渲染结果之前）。"""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """文本 → id。add_special_tokens 未指定时用 self.add_bos_token；它也是 None 时按分词器的默认（与字母打分一致）。"""
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        special = True if special is None else special
        return [int(t) for t in self.tokenizer.encode(string, add_special_tokens=special)]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """id → 文本，去掉特殊记号（与 HFLM 的 tok_decode 默认相同）。"""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ------------------------------------------------------------------ 打分核心
    @torch.inference_mode()
    def score_tokens(self, inputs: Sequence[dict[str, list[int]]], continuations: Sequence[list[int]]
                     ) -> list[tuple[float, bool]]:
        """逐请求的 (Σ 融合 log p(续写 token), 是否全为融合 argmax)。

        inputs[i][角色]：第 i 个请求该角色的完整输入 id（上下文 + 续写，未截断）；各角色的续写都是
        continuations[i]（同一分词器），位于输入的末尾。做法：
          1. 每个角色的模型输入 = 完整输入[:-1] 左截断到 max_length；完全相同的（各角色都相同）输入只算一次——
             多选题的单 token 候选共用同一个上下文，一题一次前向（与字母打分相同）；
          2. 按目标输入长度降序分批（batch_size），每个角色左填充、一次前向，只保留最后 K 个位置的 logits
             （K = 本批最长的续写）；
          3. 对每个输入，最后 k 个位置（k = 共用它的请求里最长的续写）逐位置融合（fused_log_probs），
             每个请求取其续写 token 的对数概率求和，argmax 与续写逐个比较得 is_greedy。
        """
        keys: dict[tuple[tuple[int, ...], ...], int] = {}
        users: dict[int, list[int]] = defaultdict(list)  # 唯一输入的下标 → 用它的请求
        for i, (ids, cont) in enumerate(zip(inputs, continuations)):
            if not cont:
                raise ValueError("an lm-eval request has an empty continuation: nothing to score")
            key = tuple(tuple(ids[r][:-1][-self.max_length:]) for r in self.roles)
            if not all(key):
                raise ValueError("a request has no context token to condition on")
            users[keys.setdefault(key, len(keys))].append(i)
        unique = list(keys)
        order = sorted(range(len(unique)), key=lambda u: (-len(unique[u][0]), u))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        scored: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo:lo + self.batch_size]
            need = [max(len(continuations[i]) for i in users[u]) for u in chunk]  # 每个输入要融合的位置数
            keep = max(need)
            z = []
            for k, role in enumerate(self.roles):
                model = self.models[role]
                ids, mask = left_pad([list(unique[u][k]) for u in chunk], pad_id, model.device)
                pos = (mask.cumsum(-1) - 1).clamp_min(0)
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep)
                z.append(out.logits[:, -keep:, : self.vocab_size])  # (B, keep, V)，模型精度
            for row, (u, k_u) in enumerate(zip(chunk, need)):
                lp_all = fused_log_probs([t[row, keep - k_u:].to(self._device) for t in z], self.steering)  # (k_u, V)
                for i in users[u]:
                    cont = continuations[i]
                    lp = lp_all[k_u - len(cont):]  # (n, V)：第 j 行预测续写的第 j 个 token
                    tok = torch.tensor(cont, dtype=torch.long, device=lp.device)
                    picked = lp.gather(-1, tok[:, None])[:, 0]
                    scored[i] = (float(picked.sum()), bool((lp.argmax(-1) == tok).all()))
        return scored

    def _role_context(self, role: str, text: str, target_ids: list[int]) -> list[int]:
        """某角色的上下文 id：目标（无前缀的角色）用 target_ids（lm-eval 切好的上下文 id）；有前缀的角色把
        前缀 + text 整串一起编码（与字母打分 scoring.letter_role_text 的编码相同）。"""
        prefix = self.prefixes[role]
        return self.tok_encode(prefix + text) if prefix else target_ids

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """TemplateLM.loglikelihood 已按 lm-eval 的规则切好 (上下文 id, 续写 id)；这里补上各角色的上下文再打分。"""
        # 上下文末尾的空白按 lm-eval 的 _encode_pair 规则移到了续写里：有前缀的角色编码去掉它之后的上下文。
        inputs = [{r: self._role_context(r, ctx.rstrip(), ctx_enc) + cont for r in self.roles}
                  for (ctx, _), ctx_enc, cont in requests]
        out = self.score_tokens(inputs, [cont for _, _, cont in requests])
        for ((ctx, cont_text), _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", (ctx, cont_text), res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """整段文本的对数似然：lm-eval 的滚动窗口（每个 token 恰好被预测一次，首窗以 prefix_token_id 为条件），
        每个窗口按 score_tokens 融合打分后求和。有前缀的角色在每个窗口前加上前缀的 id（窗口长度见 rolling_window）。"""
        windows: list[tuple[int, list[int], list[int]]] = []
        prefix_ids = {r: self.tok_encode(p, add_special_tokens=False) if p else [] for r, p in self.prefixes.items()}
        size = self.rolling_window()
        for i, req in enumerate(requests):
            (string,) = req.args
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=size, context_len=1)):
                windows.append((i, ctx, pred))
        scores = self.score_tokens([{r: prefix_ids[r] + ctx + pred for r in self.roles} for _, ctx, pred in windows],
                                   [pred for _, _, pred in windows])
        totals = [0.0] * len(requests)
        for (i, _, _), (lp, _) in zip(windows, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def rolling_window(self) -> int:
        """滚动窗口的长度：max_length 减去最长的角色前缀，加上前缀之后每个角色的输入仍不超过 max_length（不被截断）。"""
        longest = max(len(self.tok_encode(p, add_special_tokens=False)) if p else 0 for p in self.prefixes.values())
        if self.max_length - longest < 2:
            raise ValueError(f"max_length={self.max_length} leaves no room for rolling windows after the "
                             f"{longest}-token role prefix; raise max_length")
        return self.max_length - longest

    # ------------------------------------------------------------------ 生成
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """按 gen_kwargs 分组，每组按目标提示长度降序分批，经项目的解码器生成，再在第一个停止串处截断。

        贪心（do_sample 为假）时与 generate_batch 逐 token 相同；do_sample 时用项目的可复现采样
        （Sampling：温度、top_p，随机数由 seed 与请求在本次调用中的下标决定）。解码器只在结束记号或
        max_gen_toks 处停下；停止串之后多生成的 token 被截掉，不影响之前的 token（逐步因果）。
        """
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        kwargs_of: dict[str, dict[str, Any]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs = req.args
            key = repr(sorted(gen_kwargs.items()))
            groups[key].append(i)
            kwargs_of[key] = gen_kwargs
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for key, members in groups.items():
            kwargs = normalize_gen_kwargs(kwargs_of[key], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            sampling = None
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 0.0)) > 0:
                sampling = Sampling(float(kwargs["temperature"]), float(kwargs.get("top_p", 1.0) or 1.0), self.seed)
            room = self.max_length - max_gen
            if room < 1:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for the prompt (max_length={self.max_length})")
            target = {i: self.tok_encode(requests[i].args[0]) for i in members}
            prompts = {r: [self._role_context(r, requests[i].args[0], target[i])[-room:] for i in members]
                       for r in self.roles}
            for row, text in zip(members, self._generate(prompts, members, max_gen, sampling)):
                out[row] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[row].args, out[row])
        return [s if s is not None else "" for s in out]

    def _generate(self, prompts: dict[str, list[list[int]]], qids: list[int], max_gen: int,
                  sampling: Sampling | None) -> list[str]:
        """一组请求的生成文本（未截断停止串）。prompts[角色][j]：第 j 个请求该角色的提示 id；
        qids[j] 为它在本次调用中的下标（采样的随机数由它决定）。"""
        n = len(qids)
        order = sorted(range(n), key=lambda j: (-len(prompts["target"][j]), j))
        models = [self.models[r] for r in self.roles]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        decoder = None
        if self.fast:
            from fast.decoder import FastDecoder, length_bucket  # 快速路径只在用到时导入（见 fast/__init__.py）

            longest = max(len(prompts[r][j]) for r in self.roles for j in range(n))
            decoder = FastDecoder(models, vocab_size=self.vocab_size, end_ids=self.end_ids, pad_id=pad_id,
                                  batch_size=min(self.batch_size, n), steering=self.steering, compile=self.compile,
                                  cache_len=length_bucket(longest + max_gen), sampling=sampling)
        texts: list[str] = [""] * n
        for lo in range(0, n, self.batch_size):
            chunk = order[lo:lo + self.batch_size]
            batch = [[prompts[r][j] for j in chunk] for r in self.roles]
            ids = [qids[j] for j in chunk]
            if decoder is not None:
                result = decoder.generate(batch, max_gen, question_ids=ids)
            else:
                result = generate_batch(models, batch, vocab_size=self.vocab_size, max_new_tokens=max_gen,
                                        end_ids=self.end_ids, pad_id=pad_id, steering=self.steering,
                                        sampling=sampling, question_ids=ids)
            for j, tokens in zip(chunk, result.tokens):
                texts[j] = self.tok_decode(tokens)
        return texts

    def get_model_info(self) -> dict[str, Any]:
        """写进 lm-eval 结果 JSON 的 "config"：臂、融合参数与各角色的前缀（读者不必猜这次是哪个设置）。"""
        s = self.steering
        return {"arm": "steered" if s is not None else "baseline",
                "steering": None if s is None else dict(s.__dict__),
                "role_prefixes": self.prefixes, "add_bos_token": self.add_bos_token, "max_length": self.max_length}


def _with_modes(cfg: Config, modes: tuple[str, ...]) -> Config:
    """同一配置、换 modes（model_loader.load_models 按 modes 决定加载哪些角色：基线只加载目标）。"""
    return dataclasses.replace(cfg, modes=modes)


def predictions_from_samples(samples: Sequence[dict[str, Any]]) -> dict[int, int]:
    """lm-eval 多选题的逐题预测：doc_id → argmax_i loglikelihood(选项 i)（与 lm-eval 的 acc 同一取法：
    np.argmax，平局取下标最小者）。samples 是 simple_evaluate(log_samples=True) 结果里某个任务的列表。"""
    import numpy as np

    return {int(s["doc_id"]): int(np.argmax([float(r[0]) for r in s["filtered_resps"]])) for s in samples}
