"""Each benchmark runs at tiny size in the suite, so a broken benchmark is caught here."""

import json
from pathlib import Path

from bench import inference
from services.stack import Stack


def test_inference_bench_smoke_writes_positive_throughput(
    inference_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "inference.json"
    assert inference.main(["--url", inference_url, "--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [lvl["concurrency"] for lvl in data["levels"]] == [1, 4]
    assert all(lvl["median_tokens_per_s"] > 0 for lvl in data["levels"])


def test_gateway_bench_smoke_measures_both_parts(
    stack: Stack, gateway_url: str, redis_url: str, tmp_path: Path
) -> None:
    from bench import gateway

    out = tmp_path / "gateway.json"
    ports = [str(stack.config.ports.inference), str(stack.config.ports.gateway)]
    argv = [
        "--smoke",
        "--out",
        str(out),
        "--redis-url",
        redis_url,
        "--stack-var-dir",
        str(stack.config.var_dir),
        "--stack-ports",
        *ports,
    ]
    assert gateway.main(argv) == 0
    data = json.loads(out.read_text())
    fake = data["fake_upstream"]
    assert fake["rounds"][0]["gateway"]["n"] > 0 and fake["median_saturation_rps_gateway"] > 0
    assert data["vllm"]["median_ratio_gateway_over_direct"] > 0
    assert data["vllm"]["failed_requests"] == {"direct": [], "gateway": []}


def test_retrieval_bench_smoke_measures_every_part(tmp_path: Path) -> None:
    from bench import retrieval

    out = tmp_path / "retrieval.json"
    assert retrieval.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["index_chosen"] in ("FLAT", "HNSW")
    assert all(data["indexes"][k]["recall_at_10"] > 0 for k in ("FLAT", "HNSW"))
    for mode in ("dense", "hybrid"):
        assert data["search"][mode]["service"]["n"] > 0
        assert data["search"][mode]["raw_milvus"]["n"] > 0
        own = data["search"][mode]["service_own_ms"]  # a search less its Milvus call
        assert own["n"] == data["search"][mode]["service"]["n"]
        assert 0 < own["p50_ms"] < data["search"][mode]["service"]["p50_ms"]
    assert data["ingestion"]["median_ratio_service_over_raw"] > 0
    assert set(data["ingestion"]["service_seconds_by_phase"]) >= {"parse", "embed", "upsert"}
    assert data["backends"]["cosine_to_fp32"]["min"] > 0.9
    # Search queries on the 8-bit block export: measured against torch, really quantized.
    one = data["backends"]["one_query"]
    assert one["onnx_int8_blocks"]["n"] == one["torch_fp32"]["n"] > 0
    assert 0.99 < one["cosine_int8_blocks_to_torch"]["min"] < 0.99999
    assert data["backends"]["hit_at_5"]["int8_blocks_queries"] > 0.5
    assert data["quality"]["hybrid"]["hit_at_5"] > 0.5


def test_milvus_allocator_bench_smoke_measures_both_servers(tmp_path: Path) -> None:
    from bench import milvus_alloc

    out = tmp_path / "milvus_alloc.json"
    assert milvus_alloc.main(["--chunks", "2000", "--blocks", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for server in ("glibc_default", "kept_heap"):
        for mode in ("dense", "hybrid"):
            assert data["search"][server][mode]["n"] == 38  # 40 queries less 2 warm-ups
            assert data["search"][server][mode]["p50_ms"] > 0
        assert len(data["server_rss_mib"][server]) == 1 and data["server_rss_mib"][server][0] > 0
    assert data["ratio_default_to_kept"]["dense"]["p95_ms"] > 0


def test_milvus_engines_bench_smoke_measures_both_engines_and_a_filter_both_ways(
    tmp_path: Path,
) -> None:
    from bench import milvus_engines

    out = tmp_path / "milvus_engines.json"
    argv = ["--chunks", "2000", "--rounds", "1", "--queries", "4", "--files", "40"]
    assert milvus_engines.main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for engine in ("lite3", "lite25"):
        assert data[engine]["dense"]["n"] == data[engine]["hybrid"]["n"] == 4
        assert data[engine]["dense_recall_at_10"] == 1.0  # FLAT: exact
        assert data[engine]["insert_rows_per_s"] > 0 and data[engine]["server_rss_mib"] > 0
    f = data["filter"]
    assert f["admitted_files"] == 20 and f["same_top10"] == 1.0
    assert f["file_list"]["n"] == f["in_engine"]["n"] == 4


def test_finetune_bench_smoke_compares_the_worker_with_a_direct_call(
    gateway_url: str, admin_key: str, tmp_path: Path
) -> None:
    from bench import finetune

    key = tmp_path / "key"
    key.write_text(admin_key)
    out = tmp_path / "finetune.json"
    argv = ["--smoke", "--gateway", gateway_url, "--key-file", str(key), "--out", str(out)]
    assert finetune.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["direct_tokens_per_s"][0] > 0 and data["worker_tokens_per_s"][0] > 0
    assert data["median_ratio_worker_over_direct"] > 0
    assert data["queue_to_running_s"][0] >= 0


def test_agent_bench_smoke_measures_the_loop_and_the_tools(redis_url: str, tmp_path: Path) -> None:
    from bench import agent

    out = tmp_path / "agent.json"
    assert agent.main(["--smoke", "--redis-url", redis_url, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["loop"]["loop_overhead_ms_per_step"]["n"] == 2
    assert data["loop"]["client_ms_per_step"]["direct_model_call"]["p50"] > 0
    for tool in ("molecule_info", "similarity", "substructure_match"):
        assert data["rdkit"][tool]["sandbox_ms"]["p50"] > 0


def test_clients_bench_smoke_measures_ours_beside_the_maintained_clients(tmp_path: Path) -> None:
    from bench import clients

    out = tmp_path / "clients.json"
    assert clients.main(["--rounds", "2", "--requests", "50", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["http"]["median_cpu_us"]) == {"ours", "httpx"}
    assert set(data["redis"]["median_cpu_us"]) == {"ours", "redis-py"}
    for part in ("http", "redis"):
        assert all(len(v) == 2 and min(v) > 0 for v in data[part]["cpu_us_per_request"].values())


def test_evals_bench_smoke_compares_the_runner_with_direct_calls(
    gateway_url: str, admin_key: str, tmp_path: Path
) -> None:
    from bench import evals

    key = tmp_path / "key"
    key.write_text(admin_key)
    out = tmp_path / "evals.json"
    argv = ["--url", gateway_url, "--key-file", str(key), "--items", "4", "--rounds", "1"]
    assert evals.main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rounds"][0]["runner_items_per_s"] > 0 and data["median_ratio"] > 0


def test_streaming_bench_smoke_measures_cpu_per_token_for_each_relay(
    stack: Stack, gateway_url: str, redis_url: str, tmp_path: Path
) -> None:
    from bench import streaming

    out = tmp_path / "streaming.json"
    ports = [str(stack.config.ports.inference), str(stack.config.ports.gateway)]
    argv = ["--smoke", "--out", str(out), "--redis-url", redis_url, "--variants", "store"]
    argv += ["--stack-var-dir", str(stack.config.var_dir), "--stack-ports", *ports]
    assert streaming.main(argv) == 0
    data = json.loads(out.read_text())
    for part in ("fake", "vllm"):
        level = data[part]["levels"][0]
        assert level["direct"]["failed"] == 0 and level["direct"]["output_tok_s"][0] > 0
        for relay in ("gateway-direct", "gateway-asgi", "gateway-direct/store"):
            assert level[relay]["failed"] == 0
            assert level[relay]["median_cpu_us_per_token"] > 0


def test_recovery_bench_smoke_times_a_killed_service_coming_back(tmp_path: Path) -> None:
    from bench import recovery

    out = tmp_path / "recovery.json"
    argv = ["--rounds", "2", "--services", "milvus", "--hung-rounds", "0", "--out", str(out)]
    assert recovery.main(argv) == 0
    data = json.loads(out.read_text())
    milvus = data["after_sigkill"]["milvus"]
    assert milvus["n"] == 2 and 0 < milvus["min_s"] <= milvus["median_s"] <= milvus["max_s"]
    assert data["restarts_counted"] == {"milvus": 2}
