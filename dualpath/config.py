"""Typed configuration: dataclasses loaded from TOML and overridden by CLI flags.

A cluster file looks like::

    [model]
    preset = "tiny-gqa"          # or weights = "/path/to/hf-checkpoint"
    [store]
    root = "/var/cache/dualpath"
    snic_read_gbps = 2.0         # emulated storage NIC per node (0 = no limit)
    [[engines]]
    role = "prefill"
    node = 0
    port = 7101

Every field is validated; errors name the field and the bad value.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("prefill", "decode")
BACKENDS = ("auto", "tcp", "shm", "verbs", "cuda")
POLICIES = ("pe-read", "de-read", "dualpath", "dualpath-split")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the KV dtypes, by bytes per value
DTYPES = tuple(DTYPE_BYTES)


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the value."""


def _check(ok: bool, field_name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{field_name}' = {value!r}: {why}")


def default_store_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dualpath", "store")


@dataclass
class ModelSpec:
    """Which weights the engines run: a preset name or a Hugging Face checkpoint directory."""

    preset: str = "tiny-gqa"
    weights: str | None = None
    dtype: str = "float32"
    # The model id clients send in "model" and that /v1/models and /metrics name (vLLM's
    # --served-model-name); empty: the preset's name, or the weights directory
    served_model_name: str = ""

    def validate(self) -> None:
        from dualpath.engine.architecture import PRESETS

        if self.weights is None:
            _check(self.preset in PRESETS, "model.preset", self.preset, f"expected one of {sorted(PRESETS)}")
        else:
            _check(Path(self.weights).is_dir(), "model.weights", self.weights, "not a directory")
        _check(self.dtype in DTYPES, "model.dtype", self.dtype, f"expected one of {DTYPES}")


@dataclass
class StoreConfig:
    """The block KV store shared by every engine (a local dir or a shared-FS mount)."""

    root: str = field(default_factory=default_store_root)
    capacity_gb: float = 64.0
    # Evict least-recently-used blocks also while the store's file system has less free than this
    # (0 = by capacity_gb only): on a full disk every later write would fail.
    min_free_gb: float = 1.0
    block_tokens: int = 64
    # Emulated storage NIC, per node, applied to the real file I/O (0 = unlimited).
    snic_read_gbps: float = 0.0
    snic_write_gbps: float = 0.0
    write_queue_blocks: int = 1024  # write-behind queue depth before back-pressure
    readers: int = 4  # reader processes per engine (storage/readers.py)
    write_threads: int = 4  # persistence writes, on threads of the engine process
    read_spans: int = 8  # a request's blocks are read in this many spans of layers (see store.read_many)

    def validate(self) -> None:
        _check(self.capacity_gb > 0, "store.capacity_gb", self.capacity_gb, "must be > 0")
        _check(self.min_free_gb >= 0, "store.min_free_gb", self.min_free_gb, "must be >= 0")
        _check(self.block_tokens > 0 and self.block_tokens % 8 == 0, "store.block_tokens",
               self.block_tokens, "must be a positive multiple of 8")
        _check(self.snic_read_gbps >= 0, "store.snic_read_gbps", self.snic_read_gbps, "must be >= 0")
        _check(self.snic_write_gbps >= 0, "store.snic_write_gbps", self.snic_write_gbps, "must be >= 0")
        _check(self.write_queue_blocks > 0, "store.write_queue_blocks", self.write_queue_blocks, "must be > 0")
        _check(self.readers > 0, "store.readers", self.readers, "must be > 0")
        _check(self.write_threads > 0, "store.write_threads", self.write_threads, "must be > 0")
        _check(self.read_spans > 0, "store.read_spans", self.read_spans, "must be > 0")


@dataclass
class EngineSpec:
    """One engine process: its role, the node (host) it runs on, its control/data ports."""

    role: str
    node: int = 0
    port: int = 0  # control-plane port; the data plane listens on port + 1000
    device: str = "cpu"
    host: str = "127.0.0.1"

    @property
    def name(self) -> str:
        return f"{'pe' if self.role == 'prefill' else 'de'}{self.node}"

    def validate(self, i: int) -> None:
        _check(self.role in ROLES, f"engines[{i}].role", self.role, f"expected one of {ROLES}")
        _check(self.node >= 0, f"engines[{i}].node", self.node, "must be >= 0")
        _check(0 <= self.port < 65536, f"engines[{i}].port", self.port, "must be a TCP port")
        _check(self.device == "cpu" or self.device.startswith("cuda"), f"engines[{i}].device",
               self.device, "expected 'cpu' or 'cuda[:N]'")


@dataclass
class EngineConfig:
    """Per-engine capacities and batching knobs."""

    hbm_blocks: int = 2048          # paged KV pool size (blocks of block_tokens)
    buffer_blocks: int = 1024       # DRAM buffer pool size (blocks, all layers)
    prefill_token_quota: int = 4096  # compute quota per prefill step; longer misses are chunked
    max_decode_batch: int = 64
    max_context: int = 0            # 0 = the model's max_position
    cuda_graphs: bool = True        # decode steps replayed from CUDA graphs (on CUDA devices)
    memory_wait_s: float = 30.0     # a PE's longest wait for DRAM-buffer / HBM room; then the request fails

    def validate(self) -> None:
        for name in ("hbm_blocks", "buffer_blocks", "prefill_token_quota", "max_decode_batch"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"engine.{name}", v, "must be a positive integer")
        _check(self.max_context >= 0, "engine.max_context", self.max_context, "must be >= 0")
        _check(self.memory_wait_s > 0, "engine.memory_wait_s", self.memory_wait_s, "must be > 0")


OLD_FIXED_TOKEN = "dualpath-local"  # every cluster once shared it: anyone knowing it could join any cluster
TOKEN_ENV = "DUALPATH_TOKEN"
API_KEY_ENV = "DUALPATH_API_KEY"
MIN_TOKEN_CHARS = 16


def new_token() -> str:
    return secrets.token_hex(16)


def read_secret_file(path: str, what: str) -> str:
    """A secret kept in a file (its text, stripped), refused if the file is empty or other users
    could read it: a secret they can read protects nothing (as ssh refuses such a private key).
    `what` names the setting in errors (a config field, a command-line option)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"{what} = {path!r}: {e.strerror}") from e
    with os.fdopen(fd) as f:  # the mode of the file we read, not of whatever the path names later
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise ConfigError(f"{what} = {path!r}: other users may read it (mode {mode & 0o777:o}); chmod 600 it")
        secret = f.read().strip()
    if not secret:
        raise ConfigError(f"{what} = {path!r}: the file is empty")
    return secret


@dataclass
class TransportConfig:
    backend: str = "auto"
    # The cluster secret, proved by HMAC when a control or data connection opens (docs/SECURITY.md).
    # A config file gives it here, in token_file, or through $DUALPATH_TOKEN; `dualpath up` makes one.
    token: str = ""
    token_file: str = ""
    bulk_chunk_bytes: int = 256 << 10
    latency_share: float = 0.99     # share of the link reserved for latency traffic when both run
    rdma_device: str = ""           # verbs: "" = the first RDMA device
    rdma_port: int = 0              # verbs: 0 = the first ACTIVE port
    rdma_gid_index: int = -1        # verbs: -1 = a routable RoCE v2 GID (Ethernet), 0 (InfiniBand)
    rdma_hop_limit: int = 64        # verbs: IP TTL of routed RoCE v2

    def resolve_token(self) -> None:
        """token, else the first line of token_file, else $DUALPATH_TOKEN."""
        if not self.token and self.token_file:
            try:
                self.token = Path(self.token_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"config field 'transport.token_file' = {self.token_file!r}: {e.strerror}") from e
        if not self.token:
            self.token = os.environ.get(TOKEN_ENV, "").strip()

    def validate(self) -> None:
        _check(bool(self.token), "transport.token", "", f"the cluster secret is not set: give transport.token or "
               f"transport.token_file in the config, or ${TOKEN_ENV} (make one with: python3 -c "
               f"'import secrets; print(secrets.token_hex(16))')")
        _check(self.token != OLD_FIXED_TOKEN, "transport.token", self.token,
               "the old fixed default is public and refused; generate a secret for this cluster")
        _check(len(self.token) >= MIN_TOKEN_CHARS, "transport.token", "<hidden>",
               f"too short: a cluster secret has at least {MIN_TOKEN_CHARS} characters")
        _check(self.backend in BACKENDS, "transport.backend", self.backend, f"expected one of {BACKENDS}")
        _check(0.0 <= self.latency_share < 1.0, "transport.latency_share", self.latency_share,
               "must be in [0, 1)")
        _check(1 <= self.rdma_hop_limit <= 255, "transport.rdma_hop_limit", self.rdma_hop_limit,
               "must be in [1, 255]")
        _check(self.bulk_chunk_bytes >= 4096, "transport.bulk_chunk_bytes", self.bulk_chunk_bytes,
               "must be >= 4096")


@dataclass
class SchedulerConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    control_port: int = 7000
    policy: str = "dualpath"
    heartbeat_s: float = 0.2
    dead_after_s: float = 3.0
    # Compare sides by measured drain time (policy.py), not queue bytes, and charge path B what its
    # deliveries cost the DE's decoding. Off by default until measured on two GPUs: there, with
    # rates only, dualpath fell from 1.96x to 1.79x pe-read (session 6); on one H200, three runs
    # each (session 11), the charge gave 0.89x pe-read at 16 GB/s (0.85x off) and 1.65x at 1 GB/s
    # (1.70x off): it does not make dualpath match pe-read where storage is not the bound.
    drain_rates: bool = False
    request_timeout_s: float = 600.0  # a request not answered by then fails with 504 and frees its memory
    # A request whose engine dies after it streamed tokens continues elsewhere as prompt + those
    # tokens (sched/coordinator.py), at most this often; 0: it fails instead
    max_migrations: int = 3
    # When set, /v1/* needs 'Authorization: Bearer <key>'. The key: api_key, else the file api_key_file
    # (mode 0600), else $DUALPATH_API_KEY. A file or the environment keeps it out of `ps` and of the config.
    api_key: str = ""
    api_key_file: str = ""

    def resolve_api_key(self) -> None:
        if not self.api_key and self.api_key_file:
            self.api_key = read_secret_file(self.api_key_file, "config field 'scheduler.api_key_file'")
        if not self.api_key:
            self.api_key = os.environ.get(API_KEY_ENV, "").strip()

    def validate(self) -> None:
        _check(self.policy in POLICIES, "scheduler.policy", self.policy, f"expected one of {POLICIES}")
        _check(self.heartbeat_s > 0, "scheduler.heartbeat_s", self.heartbeat_s, "must be > 0")
        _check(self.dead_after_s > self.heartbeat_s, "scheduler.dead_after_s", self.dead_after_s,
               "must exceed heartbeat_s")
        _check(self.request_timeout_s > 0, "scheduler.request_timeout_s", self.request_timeout_s, "must be > 0")
        _check(self.max_migrations >= 0, "scheduler.max_migrations", self.max_migrations, "must be >= 0")


RANK_ENV = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")  # torchrun, SLURM, Open MPI


@dataclass
class LaunchConfig:
    """How a launcher's ranks map to processes: ``ranks[r]`` is the process that rank r runs
    ("coordinator" or an engine's name, e.g. "pe0"); empty means the coordinator, then the engines
    in file order. `dualpath run --config F` without --role reads its rank from $RANK (torchrun),
    $SLURM_PROCID (SLURM) or $OMPI_COMM_WORLD_RANK (Open MPI)."""

    ranks: list[str] = field(default_factory=list)

    def validate(self) -> None:
        pass  # checked against the engines by ClusterConfig.validate


@dataclass
class ClusterConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    store: StoreConfig = field(default_factory=StoreConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    engines: list[EngineSpec] = field(default_factory=list)

    def validate(self) -> "ClusterConfig":
        for part in (self.model, self.store, self.engine, self.transport, self.scheduler, self.launch):
            part.validate()
        for i, e in enumerate(self.engines):
            e.validate(i)
        names = [e.name for e in self.engines]
        dup = {n for n in names if names.count(n) > 1}
        _check(not dup, "engines", sorted(dup), "two engines of one role on one node; give each its own node")
        if self.launch.ranks:
            known = {"coordinator", *names}
            _check(set(self.launch.ranks) <= known, "launch.ranks", sorted(set(self.launch.ranks) - known),
                   f"not a process of this cluster (have {sorted(known)})")
            _check(len(set(self.launch.ranks)) == len(self.launch.ranks) and set(self.launch.ranks) == known,
                   "launch.ranks", self.launch.ranks, "must name the coordinator and every engine exactly once")
        return self

    def rank_map(self) -> list[str]:
        return self.launch.ranks or ["coordinator", *(e.name for e in self.engines)]

    def process_for_rank(self, rank: int) -> tuple[str, int]:
        """(role, node) of the process a launcher's rank runs."""
        ranks = self.rank_map()
        if not 0 <= rank < len(ranks):
            raise ConfigError(f"rank {rank} has no process: launch.ranks maps ranks 0..{len(ranks) - 1} "
                              f"({', '.join(ranks)})")
        if ranks[rank] == "coordinator":
            return "coordinator", 0
        e = next(e for e in self.engines if e.name == ranks[rank])
        return e.role, e.node

    def find_engine(self, role: str, node: int) -> EngineSpec:
        for e in self.engines:
            if e.role == role and e.node == node:
                return e
        raise ConfigError(f"no engine with role={role!r} node={node} in config "
                          f"(have {[e.name for e in self.engines]})")


def local_cluster(prefill: int = 1, decode: int = 2, base_port: int = 7100, **overrides: Any) -> ClusterConfig:
    """The embedded default: P prefill and D decode engines on this host, each its own node
    (so each has its own emulated storage NIC, as on a real cluster)."""
    engines = [EngineSpec("prefill", node=i, port=base_port + i) for i in range(prefill)]
    engines += [EngineSpec("decode", node=prefill + i, port=base_port + prefill + i) for i in range(decode)]
    cfg = ClusterConfig(engines=engines)
    cfg.transport.token = new_token()  # a fresh secret per cluster
    for dotted, value in overrides.items():
        set_field(cfg, dotted, value)
    return cfg


def set_field(cfg: ClusterConfig, dotted: str, value: Any) -> None:
    """Set e.g. 'store.snic_read_gbps' on a config, converting the value to the field's type."""
    section, _, name = dotted.partition(".")
    part = getattr(cfg, section, None)
    if part is None or not dataclasses.is_dataclass(part) or not hasattr(part, name):
        raise ConfigError(f"unknown config field '{dotted}'")
    current = getattr(part, name)
    if current is not None and value is not None and not isinstance(value, type(current)):
        try:
            value = type(current)(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config field '{dotted}' = {value!r}: expected {type(current).__name__}") from e
    setattr(part, name, value)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config field '{where}.{key}' (known: {sorted(known)})")
    obj = cls(**data)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and v is not None and isinstance(default, (int, float, str, bool)):
            ok = isinstance(v, type(default)) or (isinstance(default, float) and isinstance(v, int))
            _check(ok, f"{where}.{f.name}", v, f"expected {type(default).__name__}")
    return obj


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    sections = {"model": ModelSpec, "store": StoreConfig, "engine": EngineConfig,
                "transport": TransportConfig, "scheduler": SchedulerConfig, "launch": LaunchConfig}
    for key in raw:
        if key not in sections and key != "engines":
            raise ConfigError(f"unknown config section '{key}' (known: {sorted(sections) + ['engines']})")
    kwargs = {k: _build(cls, raw.get(k, {}), k) for k, cls in sections.items()}
    engines = [_build(EngineSpec, e, f"engines[{i}]") for i, e in enumerate(raw.get("engines", []))]
    kwargs["transport"].resolve_token()
    kwargs["scheduler"].resolve_api_key()
    return ClusterConfig(engines=engines, **kwargs).validate()


def write_config(cfg: ClusterConfig, path: str | os.PathLike[str]) -> None:
    """The config as TOML, readable by this user only: it holds the cluster secret."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(dump_config(cfg))


def dump_config(cfg: ClusterConfig) -> str:
    """Serialise a config to TOML (what `dualpath up` hands to each process it starts)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    out: list[str] = []
    for section in ("model", "store", "engine", "transport", "scheduler", "launch"):
        out.append(f"[{section}]")
        for k, v in dataclasses.asdict(getattr(cfg, section)).items():
            if v is not None:
                out.append(f"{k} = {fmt(v)}")
        out.append("")
    for e in cfg.engines:
        out.append("[[engines]]")
        out += [f"{k} = {fmt(v)}" for k, v in dataclasses.asdict(e).items()]
        out.append("")
    return "\n".join(out)
