"""The gateway's usage sniffer, fed reads cut at every possible byte of a stream's tail."""

import orjson

from services.gateway.proxy import Outcome
from services.gateway.usage import UsageSniffer

USAGE = {"prompt_tokens": 7, "completion_tokens": 25, "total_tokens": 32}
TAIL = (
    b'data: {"choices":[{"delta":{"content":" x"}}]}\n\n'
    + b"data: "
    + orjson.dumps({"choices": [], "usage": USAGE})
    + b"\n\ndata: [DONE]\n\n"
)


def test_usage_is_found_wherever_the_reads_cut_the_stream() -> None:
    alone = TAIL[TAIL.index(b"\n\n") + 2 :]  # the usage event first: no boundary before the cut
    for stream in (TAIL, alone):
        for cut in range(1, len(stream)):
            out = Outcome()
            sniffer = UsageSniffer(out)
            sniffer.feed(stream[:cut])
            sniffer.feed(stream[cut:])
            assert (out.prompt_tokens, out.completion_tokens) == (7, 25), (stream, cut)


def test_reads_without_an_event_boundary_keep_only_a_bounded_tail() -> None:
    sniffer = UsageSniffer(Outcome())
    sniffer.feed(b"data: " + b"x" * 100_000)
    assert len(sniffer.tail) == UsageSniffer.KEEP
    sniffer.feed(b"\n\n")
    assert sniffer.tail == b""


def test_stripping_takes_out_exactly_the_usage_event_wherever_the_reads_cut() -> None:
    without = TAIL.replace(b"data: " + orjson.dumps({"choices": [], "usage": USAGE}) + b"\n\n", b"")
    for cut in range(1, len(TAIL)):
        for second in range(cut, len(TAIL)):  # three reads: two cuts
            out = Outcome()
            sniffer = UsageSniffer(out, strip=True)
            got = b"".join(
                sniffer.feed(part) for part in (TAIL[:cut], TAIL[cut:second], TAIL[second:])
            )
            assert got == without, (cut, second)
            assert (out.prompt_tokens, out.completion_tokens) == (7, 25)


def test_without_strip_every_read_passes_unchanged() -> None:
    sniffer = UsageSniffer(Outcome())
    assert [sniffer.feed(p) for p in (TAIL[:50], TAIL[50:])] == [TAIL[:50], TAIL[50:]]


def test_usage_is_asked_for_by_splicing_or_by_encoding_again() -> None:
    import json

    from services.gateway.usage import ask_for_usage

    plain = {"model": "m", "stream": True}
    spliced = ask_for_usage(b' {"model":"m","stream":true}', plain)
    assert spliced is not None and json.loads(spliced)["stream_options"] == {"include_usage": True}
    for options in ({}, None, {"include_usage": False, "continuous_usage_stats": False}):
        body = ask_for_usage(b"{}", {**plain, "stream_options": options})
        assert body is not None
        assert json.loads(body)["stream_options"]["include_usage"] is True
    assert ask_for_usage(b"{}", {**plain, "stream_options": {"include_usage": True}}) is None
    assert ask_for_usage(b"{}", {**plain, "stream_options": "bad"}) is None  # vLLM's 400
