"""The serving replica's configuration: what it builds at start (ServeConfig) and the policy an
operator may change while it runs (SwapPolicy, Ray Serve's `user_config`).

Frozen dataclasses inside; `from_dict` is the one place a YAML/JSON mapping becomes one, and it names
the bad field. Ray Serve hands `user_config` to `reconfigure()`, which must never raise for a bad
drafter, only for a malformed policy (so a typo crash-loops loudly instead of silently serving).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from drafters.registry import DRAFTERS

T = TypeVar("T")


def _speculation(value: Any, name: str = "speculation") -> str | int:
    if value == "adaptive":
        return "adaptive"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be 'adaptive' or an int >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class ServeConfig:
    """One replica: the target, its starting drafter, limits, and where events and swaps come from."""

    model: str = "smollm2-135m-instruct"
    """Target: model name, Hugging Face folder or .gguf file (moe.loader.resolve_model)."""
    served_model_name: str | None = None
    """The `model` clients send and /v1/models lists (default: `model`)."""
    device: str = "cpu"
    """Where the target, drafter and KV cache live: cpu, cuda or cuda:N. With cuda, build_app asks
    Ray for a GPU per replica (num_gpus, default 1)."""
    dtype: str = "auto"
    """Target weights: fp32, bf16, or auto (bf16 on a GPU, fp32 on the CPU)."""
    threads: int | None = None
    """torch threads of the replica's engine; under Ray Serve, build_app sets it from the replica's
    num_cpus (at least 1). None leaves torch's setting alone (in-process use)."""
    kernels: str = "auto"
    """fp32 CPU kernels of the target and draft-lm linear layers (moe.kernels.KERNELS): auto times
    the candidates on the replica's machine and threads (cached), or one forced."""
    drafter: str = "hybrid"
    """Drafter at start (drafters.registry.DRAFTERS); promotions of `lineage` replace it."""
    draft_layers: int = 4
    """draft-lm cut at start: target layers kept."""
    draft_mode: str = "chain"
    """draft-lm: chain, topk, gumbel or beam (also used for promoted versions)."""
    fallback: str | None = "hybrid"
    """With drafter eagle: the drafter served while no eagle head exists (None: refuse to start);
    the lineage's first promoted head replaces it."""
    eagle_min_confidence: float = 0.1
    """eagle (at start and promoted): a chain stops after a token whose draft probability is below this."""
    eagle_tree_topk: int = 0
    """eagle (at start and promoted): 0 drafts chains; k >= 2 trees of each expanded node's k likeliest children."""
    speculation: str | int = "adaptive"
    """"adaptive", or a fixed draft size (0 = plain decoding)."""
    max_batch: int = 8
    """Sequences decoded together on one replica (continuous batching); KV cache slots."""
    prefill_chunk: int = 128
    """Prompt tokens prefilled per engine step while other sequences decode (0: whole prompts at once;
    serving.engine.EngineConfig.prefill_chunk)."""
    prefill_stall: float = 1.5
    """A prompt chunk rides in the decode step, sized so the step takes at most this multiple of a
    plain one (0: chunks as forwards of their own; serving.engine.EngineConfig.prefill_stall)."""
    max_len: int | None = 2048
    """Positions per sequence, prompt included, capped by the model's context (None: the whole
    context). The KV cache holds max_batch x max_len positions from the start: SmolLM2's 8192
    would take ~6 GB at max_batch 16."""
    max_waiting: int = 64
    """Requests queued for a slot beyond which a replica answers 429 with Retry-After."""
    default_max_tokens: int = 256
    """max_tokens when a request does not say."""
    stream_interval: int = 1
    """Streamed responses send a chunk once this many new tokens are ready (1: every engine step's
    tokens as they come; larger: fewer hops through Ray per token, coarser streams; SGLang's
    --stream-interval). The first and the last chunk are never held."""
    calibrate: bool = True
    """Time a few target forwards at start to seed the adaptive policy's cost model."""
    events_url: str | None = None
    """streams URL for token events (kafka://..., file:///...); None: streams.default_url(); "" = off."""
    events_topic: str | None = None
    """Topic override (default: streams' token-events topic)."""
    suffix_feed: bool = False
    """Seed the suffix drafters' shared trie from the event topic and follow it (other replicas' outputs)."""
    redis_url: str | None = None
    """Redis for promotions and heartbeats; None: $SPECTUTOR_REDIS_URL; "" = off."""
    mlflow_uri: str | None = None
    """MLflow registry polled for the champion; None: $MLFLOW_TRACKING_URI; "" = off."""
    lineage: str = "spectutor-draft"
    """Registered drafter name whose champion this replica follows."""
    swap_domain: str | None = None
    """Promotions replace the drafter of this traffic domain only (None: the default drafter)."""
    domain_lineages: dict[str, str] = field(default_factory=dict)
    """Per-domain drafters: domain -> registered lineage whose champion drafts that domain's requests
    (the request's `metadata.domain`); other domains use the default drafter. Pins apply to `lineage` only."""
    heartbeat_interval_s: float = 2.0
    """How often load is written to Redis for the trainer."""
    download_dir: str | None = None
    """Where promoted drafters are downloaded (default: $SPECTUTOR_HOME/drafters/<replica>)."""
    policy: "SwapPolicy" = field(default_factory=lambda: SwapPolicy())
    """The policy at start; `reconfigure()` replaces it."""

    def __post_init__(self) -> None:
        if self.drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}")
        if self.suffix_feed and self.drafter not in ("suffix", "auto"):
            raise ValueError(f"suffix_feed needs a drafter with suffix tries (suffix or auto), got {self.drafter!r}")
        if self.suffix_feed and self.events_url == "":
            raise ValueError("suffix_feed needs the event topic, but events_url is \"\" (events off)")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        from moe.loader import check_device_name

        check_device_name(self.device)
        if self.draft_mode not in ("chain", "topk", "gumbel", "beam"):
            raise ValueError(f"draft_mode must be chain, topk, gumbel or beam, got {self.draft_mode!r}")
        _speculation(self.speculation)
        from drafters.registry import DrafterConfig

        DrafterConfig(self.drafter, draft_mode=self.draft_mode, fallback=self.fallback,  # names a bad fallback
                      eagle_min_confidence=self.eagle_min_confidence, eagle_tree_topk=self.eagle_tree_topk,
                      kernels=self.kernels)
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0, got {self.prefill_chunk}")
        if self.prefill_stall != 0 and self.prefill_stall <= 1:
            raise ValueError(f"prefill_stall must be 0 (off) or > 1, got {self.prefill_stall}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        for name in ("max_batch", "max_waiting", "default_max_tokens", "draft_layers", "stream_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if not isinstance(self.domain_lineages, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.domain_lineages.items()):
            raise ValueError(f"domain_lineages must map domain names to lineage names, got {self.domain_lineages!r}")
        if self.swap_domain is not None and self.swap_domain in self.domain_lineages:
            raise ValueError(f"swap_domain={self.swap_domain!r} is also in domain_lineages; use one of them")
        if not isinstance(self.policy, SwapPolicy):
            raise ValueError(f"policy must be a SwapPolicy, got {type(self.policy).__name__}")

    @property
    def model_id(self) -> str:
        """The name clients use for this model."""
        return self.served_model_name or self.model

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ServeConfig":
        """Build from a YAML/JSON mapping (unknown keys are an error naming them)."""
        raw = dict(raw)
        if "policy" in raw and not isinstance(raw["policy"], SwapPolicy):
            raw["policy"] = SwapPolicy.from_dict(raw["policy"] or {})
        return _from_dict(cls, raw)


@dataclass(frozen=True)
class SwapPolicy:
    """What an operator may change on running replicas (Ray Serve user_config -> reconfigure())."""

    follow: bool = True
    """Follow the lineage's alias (False: keep whatever drafter is loaded now)."""
    alias: str = "champion"
    """Registry alias followed."""
    pinned_version: int | None = None
    """Emergency pin: load exactly this registry version and ignore promotions until unpinned."""
    speculation: str | int | None = None
    """Override ServeConfig.speculation: "adaptive", a draft size, 0 = off; None = leave it."""
    poll_interval_s: float = 10.0
    """MLflow alias poll period, the fallback when Redis is silent or down."""

    def __post_init__(self) -> None:
        if not self.alias:
            raise ValueError("alias must be non-empty")
        if self.pinned_version is not None and (isinstance(self.pinned_version, bool)
                                                or not isinstance(self.pinned_version, int)
                                                or self.pinned_version < 1):
            raise ValueError(f"pinned_version must be a registry version >= 1, got {self.pinned_version!r}")
        if self.speculation is not None:
            _speculation(self.speculation, "speculation")
        if not self.poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {self.poll_interval_s}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SwapPolicy":
        """Build from Ray Serve's user_config (unknown keys are an error naming them)."""
        return _from_dict(cls, dict(raw))


def _from_dict(cls: type[T], raw: dict[str, Any]) -> T:
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from exc
