"""A stand-in for the `tensorrt` module (and polygraphy's TensorRT backend) that records calls and checks contracts.

It has the names, enums and call contracts of the TensorRT 10.x/11.x Python API that icd uses, and runs on CPU
tensors (it reads and writes the addresses it is given), so build, `Engine` and the TensorRT denoiser run end to end
in the test suite. It proves that the code follows the API's contract, not that TensorRT accepts the graphs.

"ONNX files" for the fake are JSON: {"inputs": {name: dtype}, "outputs": {name: [dtype, symbolic shape]}}; a fake
engine plan is JSON of that network plus its optimisation profiles. Outputs are computed as: `eps` = 0.5 * `sample`,
anything else filled with 0.25.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ContractError(AssertionError):
    """The code under test broke a rule of the TensorRT API."""


class Enum:
    def __init__(self, name: str, value: int):
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"<{self.name}: {self.value}>"


def enum(*names: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: Enum(name, i) for i, name in enumerate(names)})


NUMPY = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


@dataclass
class Record:
    """Everything the fakes saw, in order, shared by one fake module and its polygraphy."""

    calls: list[tuple] = field(default_factory=list)
    loggers: list[Any] = field(default_factory=list)
    fail_build: set[str] = field(default_factory=set)
    fail_context: set[str] = field(default_factory=set)
    fail_execute: set[str] = field(default_factory=set)
    fail_profile: set[str] = field(default_factory=set)
    """Engines whose contexts refuse every optimisation profile."""
    fail_address: set[str] = field(default_factory=set)
    """Engines whose contexts refuse every tensor address."""
    nan_output: set[str] = field(default_factory=set)
    """Engines whose runs write NaN into every output (as an fp16 overflow would)."""
    memory_size: int = 4096
    violations: list[str] = field(default_factory=list)
    """Broken rules noticed where raising is impossible (in a destructor): a test fails when any is left."""

    def log(self, *call: Any) -> None:
        self.calls.append(call)

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def use_logger(self, logger: Any) -> None:
        if self.loggers and logger is not self.loggers[0]:
            raise ContractError("TensorRT requires one logger for every builder and runtime of the process")
        self.loggers.append(logger)


def resolve(shape: list, axes: dict[str, int]) -> tuple[int, ...]:
    known = dict(axes)
    for pixel, latent in (("height", "latent_height"), ("width", "latent_width")):
        if latent in known and pixel not in known:
            known[pixel] = known[latent] * 8
        if pixel in known and latent not in known:
            known[latent] = known[pixel] // 8
    return tuple(known.get(d, -1) if isinstance(d, str) else int(d) for d in shape)


class FakeEngine:
    """An ICudaEngine. It holds its Runtime only weakly: TensorRT's rule is that the caller keeps the Runtime alive
    as long as its engines (older Python bindings did not do it for the caller)."""

    def __init__(self, plan: dict, record: Record, runtime: Any):
        self.plan, self.record = plan, record
        self._runtime = weakref.ref(runtime)
        self.names = list(plan["inputs"]) + list(plan["outputs"])
        self.num_optimization_profiles = len(plan["profiles"])
        self.trt = runtime.trt

    def __del__(self) -> None:
        self.record.log("destroyed", "engine", self.plan["name"])

    def alive(self) -> None:
        if self._runtime() is None:
            raise ContractError(f"engine {self.plan['name']} used after its Runtime was destroyed")

    @property
    def num_io_tensors(self) -> int:
        self.record.log("num_io_tensors", self.plan["name"])
        return len(self.names)

    def get_device_memory_size_for_profile_v2(self, index: int) -> int:
        """Activation bytes for profile `index`: a fixed part plus 4 bytes per element of every input at its
        largest shape in that profile (so a batch-16 profile needs more than a batch-1 one)."""
        shapes = [high for _, _, high in self.plan["profiles"][index].values()]
        return self.record.memory_size + 4 * sum(int(np.prod(shape)) for shape in shapes)

    @property
    def device_memory_size_v2(self) -> int:
        return max(map(self.get_device_memory_size_for_profile_v2, range(self.num_optimization_profiles)))

    def get_tensor_name(self, index: int) -> str:
        self.record.log("get_tensor_name", self.plan["name"], index)
        return self.names[index]

    def get_tensor_mode(self, name: str) -> Enum:
        self.record.log("get_tensor_mode", self.plan["name"], name)
        return self.trt.TensorIOMode.INPUT if name in self.plan["inputs"] else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> Enum:
        self.record.log("get_tensor_dtype", self.plan["name"], name)
        dtype = self.plan["inputs"].get(name) or self.plan["outputs"][name][0]
        return getattr(self.trt, dtype)

    def get_tensor_profile_shape(self, name: str, index: int) -> list:
        return [tuple(s) for s in self.plan["profiles"][index][name]]

    def create_execution_context(self, strategy: Enum = None) -> FakeContext | None:
        self.alive()
        self.record.log("create_execution_context", self.plan["name"], strategy.name if strategy else "STATIC")
        if self.plan["name"] in self.record.fail_context:
            return None
        return FakeContext(self, strategy)


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy: Enum | None):
        self.engine, self.record = engine, engine.record
        self.user_memory = strategy is not None and strategy.name == "USER_MANAGED"
        self.memory: tuple[int, int] | None = None
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def __del__(self) -> None:
        self.record.log("destroyed", "context", self.engine.plan["name"])

    @property
    def name(self) -> str:
        return self.engine.plan["name"]

    def needed_memory(self) -> int:
        """What a run needs: the selected profile's activation memory (the engine-wide maximum before one is)."""
        if self.profile is None:
            return self.engine.device_memory_size_v2
        return self.engine.get_device_memory_size_for_profile_v2(self.profile)

    def set_device_memory(self, address: int, size: int) -> None:
        if not self.user_memory:
            raise ContractError(f"{self.name}: device memory set on a context that allocates its own")
        if size < self.needed_memory():
            raise ContractError(f"{self.name}: {size} bytes of device memory, needs {self.needed_memory()}")
        self.record.log("set_device_memory", self.name, address, size)
        self.memory = (address, size)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.record.log("set_optimization_profile_async", self.name, index, stream)
        if not 0 <= index < self.engine.num_optimization_profiles or self.name in self.record.fail_profile:
            return False
        self.profile, self.shapes, self.addresses = index, {}, {}
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.record.log("set_input_shape", self.name, name, tuple(shape))
        if self.profile is None:
            raise ContractError(f"{self.name}: input shape set before an optimisation profile was chosen")
        low, _, high = self.engine.plan["profiles"][self.profile][name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def axes(self) -> dict[str, int]:
        axes = {}
        for name, shape in self.shapes.items():
            for dim, size in zip(self.engine.plan["symbolic"][name], shape, strict=True):
                if isinstance(dim, str):
                    axes[dim] = size
        return axes

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.plan["inputs"]:
            return self.shapes.get(name, tuple(-1 for _ in self.engine.plan["symbolic"][name]))
        if set(self.shapes) != set(self.engine.plan["inputs"]):
            return tuple(-1 for _ in self.engine.plan["outputs"][name][1])
        return resolve(self.engine.plan["outputs"][name][1], self.axes())

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.record.log("set_tensor_address", self.name, name)
        if set(self.shapes) != set(self.engine.plan["inputs"]):
            raise ContractError(f"{self.name}: address of {name} set before every input shape")
        if self.name in self.record.fail_address:
            return False
        self.addresses[name] = address
        return address != 0

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.engine.alive()
        self.record.log("execute_async_v3", self.name, stream_handle)
        if self.user_memory and self.memory is None:
            raise ContractError(f"{self.name}: USER_MANAGED context run without device memory")
        if self.user_memory and self.memory[1] < self.needed_memory():
            raise ContractError(f"{self.name}: profile {self.profile} run on {self.memory[1]} bytes of device memory")
        missing = set(self.engine.names) - set(self.addresses)
        if missing:
            raise ContractError(f"{self.name}: run without addresses for {sorted(missing)}")
        if self.name in self.record.fail_execute:
            return False
        plan = self.engine.plan
        for name, (dtype, _) in plan["outputs"].items():
            out = self.view(name, dtype, self.get_tensor_shape(name))
            if name == "eps" and "sample" in self.shapes:
                out[...] = 0.5 * self.view("sample", plan["inputs"]["sample"], self.shapes["sample"])
            else:
                out[...] = 0.25
            if self.name in self.record.nan_output:
                out[...] = np.nan
        return True

    def view(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape)) if shape else 1
        kind = NUMPY[dtype]
        raw = (ctypes.c_char * (count * np.dtype(kind).itemsize)).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=kind).reshape(shape)


class FakeRuntime:
    def __init__(self, logger: Any, trt: Any):
        self.trt, self.names = trt, []
        self.engines: list[weakref.ref] = []
        trt.record.use_logger(logger)
        trt.record.log("Runtime")

    def __del__(self) -> None:
        self.trt.record.log("destroyed", "runtime", *self.names)
        alive = [engine().plan["name"] for engine in self.engines if engine() is not None]
        if alive:  # undefined behaviour in TensorRT: the engines' memory belongs to this runtime
            self.trt.record.violations.append(f"Runtime destroyed while its engines {alive} were alive")

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        try:
            plan = json.loads(bytes(data))
        except ValueError:
            return None
        self.names.append(plan["name"])
        self.trt.record.log("deserialize_cuda_engine", plan["name"])
        engine = FakeEngine(plan, self.trt.record, self)
        self.engines.append(weakref.ref(engine))
        return engine


def network_of(path: str) -> dict:
    spec = json.loads(Path(path).read_text())
    return {"name": spec["name"], "inputs": spec["inputs"], "outputs": spec["outputs"], "symbolic": spec["symbolic"]}


def plan_bytes(network: dict, profiles: list[dict]) -> bytes:
    return json.dumps({**network, "profiles": profiles}).encode()


# --- TensorRT's own builder (used where polygraphy is not installed) ----------------------------------------


class FakeBuilder:
    def __init__(self, logger: Any, trt: Any):
        trt.record.use_logger(logger)
        self.trt = trt

    def create_network(self, flags: int) -> dict:
        self.trt.record.log("create_network", flags)
        return {"flags": flags}

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig(self.trt)

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: dict, config: FakeConfig) -> bytes | None:
        self.trt.record.log("build_serialized_network", network["name"], len(config.profiles))
        if network["name"] in self.trt.record.fail_build:
            return None
        return plan_bytes(network, config.profiles)


class FakeProfile:
    def __init__(self):
        self.shapes: dict[str, list] = {}

    def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
        self.shapes[name] = [list(low), list(opt), list(high)]


class FakeConfig:
    def __init__(self, trt: Any):
        self.trt, self.profiles, self.flags = trt, [], []
        self.progress_monitor = None

    def set_memory_pool_limit(self, pool: Enum, size: int) -> None:
        self.trt.record.log("set_memory_pool_limit", pool.name, size)

    def set_flag(self, flag: Enum) -> None:
        self.flags.append(flag.name)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile.shapes)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> Any:
        return types.SimpleNamespace(serialize=lambda: b"timing:" + bytes(data))

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> Any:
        return self.cache


class FakeParser:
    def __init__(self, network: dict, logger: Any, trt: Any):
        trt.record.use_logger(logger)
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        self.network.update(network_of(path))
        return True

    def get_error(self, index: int) -> str:
        return "no error"


# --- polygraphy's TensorRT backend ------------------------------------------------------------------------


def fake_polygraphy(trt: Any) -> types.SimpleNamespace:
    """`polygraphy.backend.trt` as icd calls it: network_from_onnx_path, Profile, CreateConfig,
    engine_bytes_from_network, get_trt_logger (one global logger, as polygraphy has)."""
    record = trt.record
    logger = trt.Logger(trt.Logger.WARNING)

    class Profile:
        def __init__(self):
            self.shapes: dict[str, list] = {}

        def add(self, name, min, opt, max):  # noqa: A002 - polygraphy's own parameter names
            self.shapes[name] = [list(min), list(opt), list(max)]
            return self

    class CreateConfig:
        def __init__(self, **kwargs: Any):
            record.log("CreateConfig", kwargs)
            if kwargs.get("tf32") and not hasattr(trt.BuilderFlag, "TF32"):  # polygraphy sets trt.BuilderFlag.TF32
                raise AttributeError("type object 'tensorrt.BuilderFlag' has no attribute 'TF32'")
            self.kwargs = kwargs

    def network_from_onnx_path(path: str, **kwargs: Any) -> dict:
        record.log("network_from_onnx_path", path, kwargs)
        record.use_logger(logger)
        return network_of(path)

    def engine_bytes_from_network(network: dict, **kwargs: Any) -> bytes:
        record.log("engine_bytes_from_network", network["name"], kwargs)
        if network["name"] in record.fail_build:
            raise RuntimeError("Invalid Engine. Please ensure the engine was built correctly")
        if kwargs.get("save_timing_cache"):
            with open(kwargs["save_timing_cache"], "ab") as handle:
                handle.write(network["name"].encode())
        return plan_bytes(network, [p.shapes for p in kwargs["config"].kwargs["profiles"]])

    return types.SimpleNamespace(
        Profile=Profile,
        CreateConfig=CreateConfig,
        network_from_onnx_path=network_from_onnx_path,
        engine_bytes_from_network=engine_bytes_from_network,
        get_trt_logger=lambda: logger,
    )


# --- the module -------------------------------------------------------------------------------------------


def make_tensorrt(version: str = "10.13.0.35", record: Record | None = None, *, tf32: bool = True) -> types.ModuleType:
    """A fresh fake `tensorrt` module of this version; `module.record` holds what it saw. `tf32`: whether its
    BuilderFlag has TF32 (a TensorRT without it must not be asked for it)."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", loader=None)
    trt.__version__ = version
    trt.record = record or Record()
    major = int(version.split(".")[0])

    class ILogger:
        def __init__(self) -> None:
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Enum(n, i) for i, n in enumerate(
            ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")))  # fmt: skip

        def __init__(self, severity: Enum = None) -> None:
            self.severity = severity

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    for index, name in enumerate(("float32", "float16", "int8", "int32", "bool", "bfloat16", "int64")):
        setattr(trt, name, Enum(name, index))
    trt.ILogger, trt.Logger, trt.IProgressMonitor = ILogger, Logger, IProgressMonitor
    trt.TensorIOMode = enum("NONE", "INPUT", "OUTPUT")
    trt.ExecutionContextAllocationStrategy = enum("STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED")
    trt.MemoryPoolType = enum("WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM", "TACTIC_DRAM")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=Enum("STRONGLY_TYPED", 1))
    flags = ["DEBUG", "GPU_FALLBACK"] + (["TF32"] if tf32 else []) + (["FP16"] if major < 11 else [])  # 11: no FP16
    trt.BuilderFlag = enum(*flags)
    trt.Runtime = lambda logger: FakeRuntime(logger, trt)
    trt.Builder = lambda logger: FakeBuilder(logger, trt)
    trt.OnnxParser = lambda network, logger: FakeParser(network, logger, trt)
    return trt
