"""The gateway's usage sniffer, fed reads cut at every possible byte of a stream's tail."""

import orjson

from services.gateway.proxy import Outcome, UsageSniffer

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
