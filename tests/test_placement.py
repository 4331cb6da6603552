"""Which GPUs a launch gets: the placement decision, with a stand-in GPU inventory."""

from __future__ import annotations

import asyncio

import pytest

from llmgrpc.clients.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from llmgrpc.engines.catalogue import engine_info
from llmgrpc.server import placement
from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.launched import AdmissionGate, LaunchedModel, Replica
from llmgrpc.server.manager import EngineManager, LaunchRequest
from llmgrpc.server.registry import Registry, SpecQuery
from llmgrpc.server.settings import Settings
from llmgrpc.server.validation import check_launch
from llmgrpc.v1 import models_pb2

GB = 10**9
VLLM, TRANSFORMERS, SGLANG = engine_info("vllm"), engine_info("transformers"), engine_info("sglang")


def gpus(count: int, total: int = 80 * 2**30, free: int | None = None) -> list[placement.Gpu]:
    return [placement.Gpu(i, "H100", total, total if free is None else free) for i in range(count)]


def bf16(size_billions: float, heads: int = 0) -> placement.ModelNeed:
    return placement.ModelNeed(int(size_billions * 2 * GB), overhead=1.2, attention_heads=heads)


def place(info, need, inventory, n_gpu="", gpu_idx=(), options=None, loading=None, device="auto"):
    words = placement.GpuWords(device, n_gpu, tuple(gpu_idx))
    return placement.place(
        placement.GpuAsk(info, words, options or {}, need, "the model"), inventory, loading or {}
    )


def test_auto_chooses_the_fewest_gpus_that_fit_and_sets_tensor_parallel():
    placed = place(VLLM, bf16(70, heads=64), gpus(2), n_gpu="auto")
    assert placed.gpus == (0, 1)
    assert placed.visible_devices == "0,1"
    assert placed.engine_options["tensor_parallel_size"] == 2
    assert place(VLLM, bf16(8), gpus(2), n_gpu="auto").gpus == (0,)


def test_vllm_reserves_utilization_times_total_on_each_gpu():
    total = 80 * 2**30
    placed = place(VLLM, bf16(8), gpus(1, total), options={"gpu_memory_utilization": 0.5})
    assert placed.reserved_bytes == {0: int(0.5 * total)}
    # Its default is 0.9 of the total, however small the model: 70 GiB free is not enough.
    with pytest.raises(ResourceExhausted) as refused:
        place(VLLM, bf16(1), gpus(1, total, free=70 * 2**30))
    assert refused.value.metadata["gpu_0_needed_bytes"] == str(int(0.9 * total))
    assert refused.value.metadata["gpu_0_free_bytes"] == str(70 * 2**30)


def test_sglang_is_told_the_fraction_that_was_counted():
    placed = place(SGLANG, bf16(8), gpus(1))
    assert placed.engine_options["mem_fraction_static"] == 0.88
    assert placed.reserved_bytes == {0: int(0.88 * 80 * 2**30)}


def test_a_loading_models_reservation_is_counted():
    inventory = gpus(2)
    loading = {0: 75 * 2**30}  # a model still loading will take most of GPU 0
    assert place(TRANSFORMERS, bf16(8), inventory, loading=loading).gpus == (1,)
    with pytest.raises(ResourceExhausted):
        place(TRANSFORMERS, bf16(8), inventory, gpu_idx=[0], loading=loading)


def test_405b_in_bf16_on_eight_80_gb_gpus_is_refused_with_each_gpus_numbers():
    with pytest.raises(ResourceExhausted) as refused:
        place(VLLM, bf16(405, heads=128), gpus(8), n_gpu="auto")
    message, metadata = str(refused.value), refused.value.metadata
    assert "does not fit on 8 GPU(s)" in message and "GPU 7 (H100)" in message
    for index in range(8):
        assert int(metadata[f"gpu_{index}_needed_bytes"]) > int(metadata[f"gpu_{index}_free_bytes"])


def test_transformers_spreads_the_model_over_its_gpus():
    placed = place(TRANSFORMERS, bf16(70), gpus(4), n_gpu="2")
    assert placed.gpus == (0, 1) and "tensor_parallel_size" not in placed.engine_options
    assert placed.reserved_bytes[0] == placed.reserved_bytes[1] == -(-bf16(70).total_bytes // 2)


def test_gpus_or_indices_the_machine_lacks_are_failed_precondition_naming_what_exists():
    with pytest.raises(FailedPrecondition, match=r"sees 2 CUDA GPU\(s\): 0 \(H100\), 1 \(H100\)"):
        place(VLLM, bf16(8), gpus(2), gpu_idx=[1, 3])
    with pytest.raises(FailedPrecondition, match="4 GPUs were asked for"):
        place(VLLM, bf16(8), gpus(2), n_gpu="4")
    with pytest.raises(FailedPrecondition, match="no CUDA GPU"):
        placement.uses_gpus(placement.GpuWords("auto", "2"), [], "vLLM")
    assert placement.uses_gpus(placement.GpuWords("auto"), [], "vLLM") is False


def test_contradictions_and_heads_that_do_not_divide_are_invalid_argument():
    with pytest.raises(InvalidArgument) as refused:
        place(VLLM, bf16(8), gpus(4), n_gpu="2", options={"tensor_parallel_size": 4})
    assert refused.value.violations[0].field == "engine_options.tensor_parallel_size"
    with pytest.raises(InvalidArgument) as refused:
        place(VLLM, bf16(8, heads=32), gpus(4), n_gpu="3")
    assert refused.value.violations[0].field == "n_gpu"
    # The caller's parallel size sets the count; auto skips counts that do not divide the heads.
    assert place(SGLANG, bf16(8), gpus(4), options={"tp_size": 2}).gpus == (0, 1)
    assert place(VLLM, bf16(150, heads=32), gpus(4, total=80 * 2**30), n_gpu="auto").gpus == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("device", "n_gpu", "gpu_idx", "field"),
    [
        ("auto", "0", [], "n_gpu"),
        ("auto", "-1", [], "n_gpu"),
        ("auto", "many", [], "n_gpu"),
        ("auto", "", [0, 0], "gpu_idx"),
        ("cpu", "2", [], "n_gpu"),
        ("cpu", "", [1], "gpu_idx"),
        ("auto", "3", [0, 1], "n_gpu"),
        ("cuda:1", "", [0], "device"),
    ],
)
def test_bad_gpu_words_are_invalid_argument_naming_the_field(device, n_gpu, gpu_idx, field):
    request = models_pb2.LaunchModelRequest(
        model_name="llama-3.1", device=device, n_gpu=n_gpu, gpu_idx=gpu_idx
    )
    with pytest.raises(InvalidArgument) as refused:
        check_launch(request)
    assert field in [violation.field for violation in refused.value.violations]


class StandInGpus(EngineAvailability):
    """Every engine available, seeing the given GPUs (nothing is probed)."""

    def __init__(self, settings: Settings, inventory: list[placement.Gpu]):
        super().__init__(settings)
        self.inventory = inventory

    async def reason(self, engine: str) -> str | None:
        return None

    async def hub_reasons(self, engine: str) -> dict[str, str | None]:
        return {"huggingface": None, "modelscope": None}

    async def cuda_devices(self, engine: str) -> list[dict]:
        return [
            {"index": g.index, "name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes}
            for g in self.inventory
        ]


def manager_with(tmp_path, inventory) -> EngineManager:
    settings = Settings(cache_dir=tmp_path)
    return EngineManager(settings, Registry.load([]), StandInGpus(settings, inventory), lambda name, up: None)


def launch(size: str, engine: str = "vLLM", **words) -> LaunchRequest:
    return LaunchRequest(
        query=SpecQuery(
            model_name="llama-3.1", model_engine=engine, model_format="pytorch", size_in_billions=size
        ),
        **words,
    )


def listed(manager: EngineManager, uid: str, replicas: int = 1) -> LaunchedModel:
    model = LaunchedModel(
        uid=uid,
        query=SpecQuery(model_name="llama-3.1"),
        device="auto",
        gate=AdmissionGate(1, 1),
        replicas=[Replica(index) for index in range(replicas)],
    )
    manager.table.add(model)
    return model


def test_the_manager_plans_70b_on_two_gpus_with_tensor_parallel_two(tmp_path):
    async def scenario():
        manager = manager_with(tmp_path, gpus(2))
        model = listed(manager, "big")
        await manager.admission.check_and_place(model, launch("70", n_gpu="auto"))
        worker = model.replicas[0].new_worker()  # made, not started
        assert worker.visible_gpu == "0,1"
        assert worker.plan.gpu_count == 2 and worker.plan.device == "cuda:0"
        assert worker.plan.engine_options["tensor_parallel_size"] == 2
        assert model.device == "cuda:0,1"

    asyncio.run(scenario())


def test_two_concurrent_auto_launches_land_on_different_gpus(tmp_path):
    async def scenario():
        manager = manager_with(tmp_path, gpus(2))
        first, second = listed(manager, "first"), listed(manager, "second")
        await asyncio.gather(
            manager.admission.check_and_place(first, launch("8", n_gpu="auto")),
            manager.admission.check_and_place(second, launch("8", n_gpu="auto")),
        )
        made = [model.replicas[0].new_worker() for model in (first, second)]
        assert {worker.visible_gpu for worker in made} == {"0", "1"}

    asyncio.run(scenario())


def test_the_manager_refuses_405b_before_any_worker_starts(tmp_path):
    async def scenario():
        manager = manager_with(tmp_path, gpus(8))
        with pytest.raises(ResourceExhausted) as refused:
            await manager.launch(launch("405", n_gpu="auto"))
        assert "gpu_7_free_bytes" in refused.value.metadata
        assert manager.list() == []  # unlisted, nothing started

    asyncio.run(scenario())


def test_a_two_replica_auto_launch_on_two_gpus_lands_one_per_gpu(tmp_path):
    async def scenario():
        manager = manager_with(tmp_path, gpus(2))
        model = listed(manager, "pair", replicas=2)
        await manager.admission.check_and_place(model, launch("8", n_gpu="auto", replica=2))
        made = [replica.new_worker() for replica in model.replicas]  # made, not started
        assert [worker.visible_gpu for worker in made] == ["0", "1"]
        assert [replica.device for replica in model.replicas] == ["cuda:0", "cuda:1"]
        assert all(worker.plan.gpu_count == 1 for worker in made)
        # Each takes vLLM's reservation on its own GPU, and the model counts both.
        reserved = int(0.9 * 80 * 2**30)
        assert [replica.gpu_reserved_bytes for replica in model.replicas] == [{0: reserved}, {1: reserved}]
        assert model.estimated_bytes == 2 * reserved
        assert manager.admission.loading_reservations() == {0: reserved, 1: reserved}

    asyncio.run(scenario())


def test_replicas_that_do_not_all_fit_refuse_the_whole_launch_with_per_gpu_numbers(tmp_path):
    async def scenario():
        manager = manager_with(tmp_path, gpus(2))
        with pytest.raises(ResourceExhausted) as refused:
            await manager.launch(launch("8", n_gpu="auto", replica=3))
        error = refused.value
        assert "replica 3 of 3" in str(error) and "GPU 0" in str(error)
        assert error.metadata["replica"] == "2"
        # Both GPUs hold an earlier replica's reservation: what is left is counted, per GPU.
        left = 80 * 2**30 - int(0.9 * 80 * 2**30)
        assert error.metadata["gpu_0_free_bytes"] == str(left)
        assert manager.list() == []  # unlisted, nothing started

    asyncio.run(scenario())


def test_two_replicas_share_one_gpu_when_both_fit_and_gpu_idx_splits_by_replica():
    need = bf16(8)
    on_one = placement.place_replicas(
        placement.GpuAsk(TRANSFORMERS, placement.GpuWords("cuda:0"), {}, need, "the model"), gpus(1), {}, 2
    )
    assert [placed.gpus for placed in on_one] == [(0,), (0,)]
    words = placement.GpuWords("auto", "", (2, 3, 0, 1))
    split = placement.place_replicas(
        placement.GpuAsk(VLLM, words, {}, bf16(70, 64), "the model"), gpus(4), {}, 2
    )
    assert [placed.gpus for placed in split] == [(2, 3), (0, 1)]
    assert all(placed.engine_options["tensor_parallel_size"] == 2 for placed in split)


@pytest.mark.parametrize(
    "replica, gpu_idx, field",
    [(0, [], "replica"), (-1, [], "replica"), (65, [], "replica"), (2, [0, 1, 2], "gpu_idx")],
)
def test_bad_replica_counts_are_invalid_argument_naming_the_field(replica, gpu_idx, field):
    request = models_pb2.LaunchModelRequest(
        model_name="llama-3.1", device="cuda", replica=replica, gpu_idx=gpu_idx
    )
    with pytest.raises(InvalidArgument) as refused:
        check_launch(request)
    assert field in [violation.field for violation in refused.value.violations]


def test_n_gpu_counts_one_replicas_gpus_when_gpu_idx_lists_them_all():
    check_launch(
        models_pb2.LaunchModelRequest(model_name="llama-3.1", n_gpu="2", gpu_idx=[0, 1, 2, 3], replica=2)
    )


def test_n_gpu_is_tensor_times_pipeline_parallel_and_one_size_follows_from_the_other():
    # Only the pipeline size given: the tensor size follows, and the reverse.
    placed = place(VLLM, bf16(70, heads=64), gpus(4), n_gpu="4", options={"pipeline_parallel_size": 2})
    assert placed.gpus == (0, 1, 2, 3)
    assert placed.engine_options["tensor_parallel_size"] == 2
    assert placed.engine_options["pipeline_parallel_size"] == 2
    placed = place(VLLM, bf16(70, heads=64), gpus(4), n_gpu="4", options={"tensor_parallel_size": 1})
    assert placed.engine_options["pipeline_parallel_size"] == 4
    # Both given without n_gpu: the launch takes their product.
    options = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    assert place(VLLM, bf16(8, heads=32), gpus(4), options=options).gpus == (0, 1, 2, 3)
    assert place(SGLANG, bf16(8), gpus(4), options={"pp_size": 2}).engine_options["tp_size"] == 1
    # n_gpu alone stays tensor parallel.
    placed = place(VLLM, bf16(8, heads=32), gpus(2), n_gpu="2")
    assert "pipeline_parallel_size" not in placed.engine_options


def test_auto_with_a_pipeline_size_tries_whole_stages():
    placed = place(VLLM, bf16(150, heads=32), gpus(4), n_gpu="auto", options={"pipeline_parallel_size": 2})
    assert placed.gpus == (0, 1, 2, 3)
    assert placed.engine_options["tensor_parallel_size"] == 2
    placed = place(VLLM, bf16(8, heads=32), gpus(4), n_gpu="auto", options={"pipeline_parallel_size": 2})
    assert placed.gpus == (0, 1) and placed.engine_options["tensor_parallel_size"] == 1


def test_pipeline_sizes_that_contradict_n_gpu_or_the_heads_are_invalid_argument_naming_the_fields():
    both = {"tensor_parallel_size": 2, "pipeline_parallel_size": 1}
    with pytest.raises(InvalidArgument) as refused:
        place(VLLM, bf16(8), gpus(4), n_gpu="4", options=both)
    fields = {violation.field for violation in refused.value.violations}
    assert fields == {"engine_options.tensor_parallel_size", "engine_options.pipeline_parallel_size"}
    with pytest.raises(InvalidArgument) as refused:
        place(VLLM, bf16(8), gpus(4), n_gpu="4", options={"pipeline_parallel_size": 3})
    assert refused.value.violations[0].field == "engine_options.pipeline_parallel_size"
    assert "must divide 4" in refused.value.violations[0].description
    with pytest.raises(InvalidArgument) as refused:
        place(VLLM, bf16(8), gpus(4), n_gpu="2", options={"tensor_parallel_size": 4})
    assert refused.value.violations[0].field == "engine_options.tensor_parallel_size"
    # Tensor parallelism splits the heads: 4 GPUs in 2 stages leave 2 shards, 6 heads / 3 shards.
    assert place(VLLM, bf16(8, heads=6), gpus(4), n_gpu="4", options={"pipeline_parallel_size": 2}).gpus
    with pytest.raises(InvalidArgument) as refused:
        place(VLLM, bf16(8, heads=6), gpus(4), n_gpu="4", options={"pipeline_parallel_size": 1})
    assert refused.value.violations[0].field == "n_gpu"
    with pytest.raises(FailedPrecondition, match="4 GPUs were asked for"):
        place(VLLM, bf16(8), gpus(2), options={"tensor_parallel_size": 2, "pipeline_parallel_size": 2})


def test_a_ray_launch_checks_this_hosts_share_of_gpus_beyond_its_own():
    # 405B in bf16 over 16 GPUs, two hosts of 8 on a Ray cluster: this host's 8 take 1/16 each.
    options = {"tensor_parallel_size": 8, "pipeline_parallel_size": 2, "ray_address": "10.0.0.1:6379"}
    placed = place(VLLM, bf16(405, heads=128), gpus(8), options=options)
    assert placed.gpus == tuple(range(8))
    assert placed.engine_options["pipeline_parallel_size"] == 2
    assert placed.engine_options["tensor_parallel_size"] == 8
    del options["ray_address"]  # on this host alone, 16 GPUs are not there
    with pytest.raises(FailedPrecondition, match="16 GPUs were asked for"):
        place(VLLM, bf16(405, heads=128), gpus(8), options=options)
    with pytest.raises(ResourceExhausted):  # this host's share must still fit
        place(
            VLLM,
            bf16(405, heads=128),
            gpus(8),
            options={
                **options,
                "pipeline_parallel_size": 1,
                "tensor_parallel_size": 8,
                "distributed_executor_backend": "ray",
            },
        )
