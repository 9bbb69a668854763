"""GRPO for a Qwen2.5-VL policy with the five reference rewards, in two modes.

* ``mode="episodes"`` (default): GRPO on whole multi-turn episodes, our own loop in plain torch on a transformers
  model (below).
* ``mode="steps"``: ``trl.GRPOTrainer`` on the reference's per-step RL layout: every state of an oracle trajectory
  (an ``ibisagent export --format hf`` row) is one prompt; its group of sampled replies is scored by the TRL reward
  functions of :mod:`ibisagent.rewards.trl`, which apply each reply's action through the segmenter
  (:func:`run_trl_grpo_steps`).

Why whole episodes do not go through ``trl.GRPOTrainer``: in TRL 1.16 its multi-turn hooks cannot carry our
observations. ``rollout_func`` returns token ids only and the trainer then runs the policy-gradient forward pass with
``images = None``, so image tokens of later turns have no pixels ("image features and image tokens do not match");
``environment_factory`` feeds results back as ``tool`` messages, and Qwen2.5-VL chat templates drop images in tool
messages. Here every new overlay is a new ``user`` turn with its image, as the reference does, and the loss is
computed on exactly what was sampled.

One optimizer step of the episodes mode:

1. take ``cases_per_step`` cases; for each, sample ``group_size`` full episodes through
   :class:`~ibisagent.env.SegmentationEnv` (the policy's reply is parsed, the environment applies it through the
   segmenter; unparseable replies end the episode and are recorded);
2. score every turn with the five reference rewards (:func:`ibisagent.rewards.score_transition`);
3. advantages, normalized within each case's group: ``episode`` mode gives every turn of an episode the group-
   normalized mean turn reward of that episode; ``turn`` mode normalizes each turn's discounted reward-to-go over
   all turns of the group;
4. loss per reply token: ``-min(r * A, clip(r, 1 - eps, 1 + eps) * A) + beta * KL`` (``r`` the probability ratio to
   the sampling policy, KL the k3 estimator to a frozen reference copy), averaged per reply, then over replies.

Every step logs each reward component, the episode return, final IoU, turns, stop reasons, loss and KL
(``grpo_log.jsonl`` in ``output_dir``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.env import EnvConfig, SegmentationEnv
from ibisagent.policies._chat import ChatBuilder

__all__ = ["EpisodeRollout", "GRPOCase", "GRPORunConfig", "GRPOResult", "TurnSample", "compute_advantages",
           "load_grpo_cases", "load_grpo_step_dataset", "rollout_episode", "run_grpo", "run_trl_grpo_steps"]

log = logging.getLogger(__name__)


class GRPOConfigError(ValueError):
    """Options of a GRPO run that cannot work together (e.g. group size 1)."""


@dataclass
class GRPORunConfig:
    """Options of one multi-turn GRPO run (CLI flags mirror these; paper: group 4, lr 1e-6)."""

    model_path: str = field(metadata={"help": "Qwen2.5-VL checkpoint directory (usually the SFT result)"})
    output_dir: str = field(metadata={"help": "where the trained model and grpo_log.jsonl go"})
    mode: str = field(default="episodes", metadata={
        "help": "episodes: whole multi-turn episodes (our loop); steps: one turn per prompt from an hf export, "
                "with trl.GRPOTrainer (the reference's per-step RL layout)"})
    data: str | None = field(default=None, metadata={"help": "episodes mode: manifest root with index.jsonl"})
    dataset: str | None = field(default=None, metadata={"help": "steps mode: `ibisagent export --format hf` folder"})
    split: str = field(default="train", metadata={"help": "manifest split"})
    max_cases: int | None = field(default=None, metadata={"help": "use at most this many cases"})
    segmenter: str = field(default="litemedsam-click", metadata={"help": "segmenter that applies the actions"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    cases_per_step: int = field(default=2, metadata={"help": "cases (steps mode: prompts) per step, each gets a group"})
    group_size: int = field(default=4, metadata={"help": "episodes sampled per case (GRPO group)"})
    max_turns: int = field(default=8, metadata={"help": "turns per episode (reference inference: 20)"})
    history: bool = field(default=False, metadata={"help": "send earlier turns (reference default: off)"})
    prompts: str = field(default="reference", metadata={"help": "prompt template name or JSON file"})
    grammar: str = field(default="reference", metadata={"help": "reference or extended (adds Box)"})
    learning_rate: float = field(default=1e-6, metadata={"help": "learning rate (paper: 1e-6)"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the frozen reference (0: no reference)"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range"})
    ppo_epochs: int = field(default=1, metadata={"help": "updates per batch of rollouts"})
    advantage: str = field(default="episode", metadata={"help": "episode or turn (reward-to-go) advantages"})
    gamma: float = field(default=1.0, metadata={"help": "discount for turn advantages"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the rollouts"})
    max_new_tokens: int = field(default=256, metadata={"help": "reply length limit"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    freeze_vision: bool = field(default=True, metadata={"help": "keep the vision tower frozen"})
    reward_mode: str = field(default="reference", metadata={"help": "ibisagent.rewards mode"})
    reward_config: dict[str, Any] = field(default_factory=dict, metadata={"help": "RewardConfig overrides"})
    max_pixels: int | None = field(default=262_144, metadata={"help": "image resize budget"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, auto"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    save_every: int = field(default=0, metadata={"help": "save every N steps (0: only at the end)"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def validate(self) -> None:
        if self.mode not in ("episodes", "steps"):
            raise GRPOConfigError("mode must be 'episodes' (multi-turn) or 'steps' (single-turn, TRL GRPOTrainer)")
        if self.group_size < 2:
            raise GRPOConfigError("group_size must be >= 2: GRPO normalizes rewards within a group")
        if self.advantage not in ("episode", "turn"):
            raise GRPOConfigError("advantage must be 'episode' or 'turn'")
        if self.max_turns < 1 or self.steps < 1 or self.cases_per_step < 1 or self.ppo_epochs < 1:
            raise GRPOConfigError("max_turns, steps, cases_per_step and ppo_epochs must be >= 1")
        if self.temperature <= 0:
            raise GRPOConfigError("temperature must be > 0: GRPO needs sampled, different episodes")
        if self.beta < 0 or self.clip_eps <= 0:
            raise GRPOConfigError("beta must be >= 0 and clip_eps > 0")


@dataclass(frozen=True)
class GRPOCase:
    image: np.ndarray
    gt: np.ndarray
    query: str
    id: str = ""


@dataclass
class TurnSample:
    """One policy turn: the model inputs of the prompt, the sampled reply tokens, its rewards."""

    inputs: dict[str, Any]
    completion_ids: Any  # 1-D LongTensor (reply tokens incl. the end-of-turn token when generated)
    reply: str
    rewards: Any  # ibisagent.rewards.RewardBreakdown
    advantage: float = 0.0
    old_logprobs: Any = None


@dataclass
class EpisodeRollout:
    case_id: str
    turns: list[TurnSample]
    stop_reason: str | None
    final_iou: float

    @property
    def mean_reward(self) -> float:
        return float(np.mean([t.rewards.total for t in self.turns])) if self.turns else 0.0


@dataclass
class GRPOResult:
    output_dir: Path
    log: list[dict[str, Any]]


def load_grpo_cases(root: str | Path, split: str = "train", max_cases: int | None = None) -> list[GRPOCase]:
    """2D cases with a non-empty mask from a manifest root."""
    from ibisagent.io import load_case, load_manifest

    cases = []
    for c in load_manifest(root, split=split):  # type: ignore[arg-type]
        if c.mask is None:
            continue
        image, mask = load_case(c)
        cases.append(GRPOCase(image.array, np.asarray(mask, bool), c.query, c.id))
        if max_cases is not None and len(cases) >= max_cases:
            break
    if not cases:
        raise GRPOConfigError(f"no 2D cases with masks under {root} (split {split})")
    return cases


# ------------------------------------------------------------------------------------------------------------------
# Rollouts
# ------------------------------------------------------------------------------------------------------------------

def _generate(model: Any, processor: Any, inputs: dict[str, Any], cfg: GRPORunConfig, generator_seed: int) -> Any:
    import torch

    tok = processor.tokenizer
    torch.manual_seed(generator_seed)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=None,
                             max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    ids = out[0, inputs["input_ids"].shape[1]:]
    eos = (ids == tok.eos_token_id).nonzero()
    if len(eos):
        ids = ids[: int(eos[0]) + 1]
    return ids


class _SamplingPolicy:
    """The model as an :class:`~ibisagent.episode.ActingPolicy`: samples one reply per observation and keeps the
    prompt inputs and reply token ids of every turn (for the loss)."""

    def __init__(self, model: Any, processor: Any, chat: ChatBuilder, cfg: GRPORunConfig, seed: int) -> None:
        self.model, self.processor, self.chat, self.cfg, self.seed = model, processor, chat, cfg, seed
        self.device = str(next(model.parameters()).device)
        self.samples: list[tuple[dict[str, Any], Any]] = []

    def begin_episode(self, *, image: Any, query: str, gt: Any = None) -> None:
        self.chat.begin_episode()
        self.samples = []

    def act(self, obs: Any) -> str:
        from ibisagent.policies.hf import encode_chat

        messages, images = self.chat.messages(obs)
        inputs = dict(encode_chat(self.processor, messages, images, device=self.device))
        ids = _generate(self.model, self.processor, inputs, self.cfg, self.seed * 1000 + len(self.samples))
        reply = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        self.chat.record_reply(reply)
        self.samples.append((inputs, ids))
        return reply


def rollout_episode(model: Any, processor: Any, env: SegmentationEnv, case: GRPOCase, cfg: GRPORunConfig,
                    seed: int, chat: ChatBuilder | None = None) -> EpisodeRollout:
    """Sample one episode (:func:`ibisagent.episode.drive`): every turn the policy replies, the environment applies
    it, the reply is scored."""
    from ibisagent.episode import drive
    from ibisagent.rewards import RewardConfig, score_transition

    rcfg = RewardConfig.from_dict(cfg.reward_config) if cfg.reward_config else RewardConfig()
    sampler = _SamplingPolicy(model, processor, chat or ChatBuilder(history=cfg.history), cfg, seed)
    turns: list[TurnSample] = []
    stop = None
    for turn in drive(env, sampler, case.image, case.query, case.gt):
        info = turn.info
        rewards = score_transition(turn.reply, gt=case.gt, mask_before=turn.observation.mask,
                                   mask_after=info["mask"], step=int(info["step"]), config=rcfg, mode=cfg.reward_mode)
        inputs, ids = sampler.samples[-1]
        turns.append(TurnSample(inputs, ids, turn.reply, rewards))
        stop = turn.stop_reason
    final_iou = env.current_iou() or 0.0
    return EpisodeRollout(case.id, turns, stop, float(final_iou))


def compute_advantages(group: list[EpisodeRollout], mode: str = "episode", gamma: float = 1.0) -> None:
    """Set ``turn.advantage`` for every turn of a group of episodes of the same case (in place)."""
    if mode == "episode":
        returns = np.array([ep.mean_reward for ep in group], np.float64)
        mu, sd = returns.mean(), returns.std()
        for ep, r in zip(group, returns):
            adv = 0.0 if sd < 1e-8 else float((r - mu) / (sd + 1e-4))
            for t in ep.turns:
                t.advantage = adv
        return
    togo: list[list[float]] = []
    for ep in group:
        acc, vals = 0.0, []
        for t in reversed(ep.turns):
            acc = t.rewards.total + gamma * acc
            vals.append(acc)
        togo.append(vals[::-1])
    flat = np.array([v for vals in togo for v in vals], np.float64)
    mu, sd = (flat.mean(), flat.std()) if len(flat) else (0.0, 0.0)
    for ep, vals in zip(group, togo):
        for t, v in zip(ep.turns, vals):
            t.advantage = 0.0 if sd < 1e-8 else float((v - mu) / (sd + 1e-4))


# ------------------------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------------------------

def completion_logprobs(model: Any, inputs: dict[str, Any], completion_ids: Any, temperature: float = 1.0) -> Any:
    """Log-probabilities of ``completion_ids`` following the prompt ``inputs`` (1-D tensor, one per reply token)."""
    import torch

    prompt_ids = inputs["input_ids"]
    ids = torch.cat([prompt_ids, completion_ids[None].to(prompt_ids.device)], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        mm = inputs["mm_token_type_ids"]
        extra["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(completion_ids[None]).to(mm)], dim=1)
    n = completion_ids.shape[0]
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=n + 1, **extra)
    logits = out.logits[0, :-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids[:, None].to(logits.device)).squeeze(-1)


def _turn_loss(model: Any, ref: Any, turn: TurnSample, cfg: GRPORunConfig) -> tuple[Any, dict[str, float]]:
    import torch

    logp = completion_logprobs(model, turn.inputs, turn.completion_ids, cfg.temperature)
    old = turn.old_logprobs if turn.old_logprobs is not None else logp.detach()
    ratio = torch.exp(logp - old)
    adv = torch.tensor(turn.advantage, dtype=logp.dtype, device=logp.device)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv
    per_token = -torch.min(unclipped, clipped)
    kl_mean = 0.0
    if cfg.beta > 0 and ref is not None:
        with torch.no_grad():
            ref_logp = ref(turn)
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + cfg.beta * kl
        kl_mean = float(kl.mean().detach())
    loss = per_token.mean()
    clip_frac = float(((ratio - 1).abs() > cfg.clip_eps).float().mean().detach())
    return loss, {"kl": kl_mean, "clip_frac": clip_frac}


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------

def _prepare_model(cfg: GRPORunConfig) -> tuple[Any, Any, Any, Any]:
    """(model to train, processor, reference log-prob function or None, LoadedVL)."""
    import torch

    from ibisagent.policies.hf import load_vl_checkpoint

    vl = load_vl_checkpoint(cfg.model_path, device=cfg.device, dtype=cfg.dtype, max_pixels=cfg.max_pixels)
    model = vl.model
    ref_fn = None
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        pattern = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=pattern, task_type="CAUSAL_LM"))
        if cfg.beta > 0:
            def ref_fn(turn: TurnSample) -> Any:
                with model.disable_adapter():
                    return completion_logprobs(model, turn.inputs, turn.completion_ids, cfg.temperature)
    else:
        if cfg.freeze_vision:
            for name, p in model.named_parameters():
                if "visual" in name:
                    p.requires_grad_(False)
        if cfg.beta > 0:
            ref_model = copy.deepcopy(model).eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)

            def ref_fn(turn: TurnSample) -> Any:
                return completion_logprobs(ref_model, turn.inputs, turn.completion_ids, cfg.temperature)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.eval()  # rollouts in eval mode; Qwen2.5-VL has no dropout, so the loss pass sees the same function
    torch.manual_seed(cfg.seed)
    return model, vl.processor, ref_fn, vl


def _step_metrics(rollouts: list[EpisodeRollout]) -> dict[str, Any]:
    from ibisagent.rewards import COMPONENTS

    turns = [t for ep in rollouts for t in ep.turns]
    m: dict[str, Any] = {f"reward/{k}": float(np.mean([getattr(t.rewards, k) for t in turns])) for k in COMPONENTS}
    m["reward/total"] = float(np.mean([t.rewards.total for t in turns]))
    m["reward/total_std"] = float(np.std([t.rewards.total for t in turns]))
    m["episode/mean_reward"] = float(np.mean([ep.mean_reward for ep in rollouts]))
    m["episode/final_iou"] = float(np.mean([ep.final_iou for ep in rollouts]))
    m["episode/turns"] = float(np.mean([len(ep.turns) for ep in rollouts]))
    m["episode/stop_reasons"] = dict(Counter(str(ep.stop_reason) for ep in rollouts))
    m["completion/mean_tokens"] = float(np.mean([len(t.completion_ids) for t in turns]))
    return m


def run_grpo(cfg: GRPORunConfig, cases: list[GRPOCase] | None = None, segmenter: Any = None) -> GRPOResult:
    """Train with multi-turn GRPO; ``cases`` (else ``cfg.data``) are the episodes' images, masks and queries."""
    import torch

    from ibisagent.segmenters.base import create_segmenter

    cfg.validate()
    if cfg.mode == "steps":
        return run_trl_grpo_steps(cfg)
    if cases is None:
        if not cfg.data:
            raise GRPOConfigError("give cases or cfg.data (a manifest root)")
        cases = load_grpo_cases(cfg.data, cfg.split, cfg.max_cases)
    if not cases:
        raise GRPOConfigError("no cases to train on")
    model, processor, ref_fn, vl = _prepare_model(cfg)
    seg = segmenter if segmenter is not None else create_segmenter(cfg.segmenter)
    env = SegmentationEnv(seg, EnvConfig(max_steps=cfg.max_turns, history=cfg.history, prompts=cfg.prompts,
                                         grammar=cfg.grammar))  # type: ignore[arg-type]
    chat = ChatBuilder(history=cfg.history)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise GRPOConfigError("no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    logf = (out / "grpo_log.jsonl").open("a")
    rng = random.Random(cfg.seed)
    order: list[int] = []
    history: list[dict[str, Any]] = []
    try:
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            rollouts: list[EpisodeRollout] = []
            for _ in range(cfg.cases_per_step):
                if not order:
                    order = list(range(len(cases)))
                    rng.shuffle(order)
                case = cases[order.pop()]
                group = [rollout_episode(model, processor, env, case, cfg, seed=rng.randrange(1 << 30), chat=chat)
                         for _ in range(cfg.group_size)]
                compute_advantages(group, cfg.advantage, cfg.gamma)
                rollouts += group
            turns = [t for ep in rollouts for t in ep.turns]
            t_roll = time.perf_counter() - t0
            if cfg.ppo_epochs > 1:
                with torch.no_grad():
                    for t in turns:
                        t.old_logprobs = completion_logprobs(model, t.inputs, t.completion_ids, cfg.temperature)
            losses, kls, clips, grad_norm = [], [], [], 0.0
            model.train(cfg.gradient_checkpointing)  # HF checkpointing is active in train mode only (no dropout)
            for _ in range(cfg.ppo_epochs):
                opt.zero_grad(set_to_none=True)
                for t in turns:
                    loss, info = _turn_loss(model, ref_fn, t, cfg)
                    (loss / len(turns)).backward()
                    losses.append(float(loss.detach()))
                    kls.append(info["kl"])
                    clips.append(info["clip_frac"])
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                opt.step()
            model.eval()
            metrics = {"step": step, **_step_metrics(rollouts), "loss": float(np.mean(losses)),
                       "kl": float(np.mean(kls)), "clip_frac": float(np.mean(clips)),
                       "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                       "rollout_s": round(t_roll, 3), "step_s": round(time.perf_counter() - t0, 3)}
            history.append(metrics)
            logf.write(json.dumps(metrics) + "\n")
            logf.flush()
            log.info("grpo step %d: reward %.3f loss %.4f kl %.4f iou %.3f", step, metrics["reward/total"],
                     metrics["loss"], metrics["kl"], metrics["episode/final_iou"])
            if cfg.save_every and step % cfg.save_every == 0:
                _save(model, vl.path, out / f"step_{step:06d}")
    finally:
        logf.close()
    _save(model, vl.path, out)
    return GRPOResult(out, history)


def _save(model: Any, base: Path, out: Path) -> None:
    from ibisagent.training.trl_sft import finalize_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    finalize_checkpoint(base, out)


# ------------------------------------------------------------------------------------------------------------------
# Single-turn GRPO with trl.GRPOTrainer (the reference's per-step RL layout)
# ------------------------------------------------------------------------------------------------------------------

def load_grpo_step_dataset(path: str | Path, split: str = "train", max_rows: int | None = None) -> Any:
    """An ``ibisagent export --format hf`` dataset as GRPOTrainer prompts: plain-text system/user messages (TRL puts
    the image placeholder in the user turn), decoded ``images`` and the state columns the rewards read."""
    import datasets

    from ibisagent.training.trl_sft import load_sft_dataset

    ds = load_sft_dataset(path, split, max_rows)
    needed = {"image_path", "ground_truth", "step"}
    missing = sorted(needed - set(ds.column_names))
    if missing:
        raise GRPOConfigError(f"dataset {path} lacks the state column(s) {missing} the rewards need; "
                              "export it with `ibisagent export SYNTH_DIR --format hf`")

    def text_only(row: dict[str, Any]) -> dict[str, Any]:
        msgs = []
        for m in row["prompt"]:
            content = m["content"]
            if not isinstance(content, str):
                content = "".join(p.get("text") or "" for p in content if p.get("type") == "text")
            msgs.append({"role": m["role"], "content": content})
        return {"prompt": msgs}

    ds = ds.map(text_only)
    if "completion" in ds.column_names:
        ds = ds.remove_columns(["completion"])
    if "images" in ds.column_names:  # the export stores paths: decode them to PIL images on access
        ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    return ds


def run_trl_grpo_steps(cfg: GRPORunConfig) -> GRPOResult:
    """GRPO with ``trl.GRPOTrainer`` on per-step prompts: each prompt (one state of an oracle trajectory) gets
    ``group_size`` sampled replies; each reply's action is applied through the segmenter by the TRL reward functions
    of :mod:`ibisagent.rewards.trl` (one per component, weighted 1/5 each = the reference total)."""
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from ibisagent.policies.hf import load_vl_checkpoint
    from ibisagent.rewards import COMPONENTS, RewardConfig
    from ibisagent.rewards.trl import make_reward_functions
    from ibisagent.training.trl_sft import finalize_checkpoint

    if not cfg.dataset:
        raise GRPOConfigError("steps mode needs dataset=<ibisagent export --format hf folder>")
    ds = load_grpo_step_dataset(cfg.dataset, cfg.split, cfg.max_cases)
    vl = load_vl_checkpoint(cfg.model_path, device=cfg.device, dtype=cfg.dtype, max_pixels=cfg.max_pixels)
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        pattern = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=pattern,
                                 task_type="CAUSAL_LM")
    elif cfg.freeze_vision:
        for name, p in vl.model.named_parameters():
            if "visual" in name:
                p.requires_grad_(False)
    out = Path(cfg.output_dir)
    rcfg = RewardConfig.from_dict(cfg.reward_config) if cfg.reward_config else RewardConfig()
    args = GRPOConfig(
        output_dir=str(out), max_steps=cfg.steps, learning_rate=cfg.learning_rate,
        num_generations=cfg.group_size, per_device_train_batch_size=cfg.group_size * cfg.cases_per_step,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        beta=cfg.beta, epsilon=cfg.clip_eps, num_iterations=cfg.ppo_epochs, max_grad_norm=cfg.max_grad_norm,
        reward_weights=[rcfg.weight(c) / len(COMPONENTS) for c in COMPONENTS], remove_unused_columns=False,
        gradient_checkpointing=cfg.gradient_checkpointing, bf16=vl.dtype == torch.bfloat16, fp16=False,
        use_cpu=vl.device == "cpu", logging_steps=1, save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500, report_to="none", seed=cfg.seed,
    )
    trainer = GRPOTrainer(model=vl.model, reward_funcs=make_reward_functions(rcfg, segmenter=cfg.segmenter,
                                                                             components=COMPONENTS),
                          args=args, train_dataset=ds, processing_class=vl.processor, peft_config=peft_config)
    trainer.train()
    trainer.save_model(str(out))
    finalize_checkpoint(vl.path, out)
    history = []
    for h in trainer.state.log_history:
        if "loss" not in h:
            continue
        m = {"step": int(h.get("step", len(history) + 1)), "loss": float(h["loss"]), "kl": float(h.get("kl", 0.0)),
             "reward/total": float(h.get("reward", float("nan"))),
             "reward/total_std": float(h.get("reward_std", float("nan")))}
        m.update({f"reward/{c}": float(h.get(f"rewards/{c}_reward/mean", float("nan"))) for c in COMPONENTS})
        m["trl"] = h
        history.append(m)
    (out / "grpo_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    with (out / "grpo_log.jsonl").open("a") as f:
        for m in history:
            f.write(json.dumps(m, default=float) + "\n")
    return GRPOResult(out, history)
