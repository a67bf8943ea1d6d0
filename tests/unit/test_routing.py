"""The backend choice is a pure function: checked with properties over random fleets."""

from hypothesis import given
from hypothesis import strategies as st

from services.common.upstream import Pool
from services.gateway.routing import Backend, choose

fleets = st.lists(st.tuples(st.integers(0, 50), st.booleans()), min_size=0, max_size=8)


def _fleet(spec: list[tuple[int, bool]]) -> list[Backend]:
    return [
        Backend(
            f"http://10.0.0.{i}:8000", Pool(f"http://10.0.0.{i}:8000"), outstanding=o, healthy=h
        )
        for i, (o, h) in enumerate(spec)
    ]


@given(fleets, st.data())
def test_choice_is_a_healthy_untried_backend_with_the_fewest_outstanding(spec, data) -> None:
    backends = _fleet(spec)
    tried = data.draw(st.lists(st.sampled_from(backends), unique=True)) if backends else []
    chosen = choose(backends, tried)
    eligible = [b for b in backends if b.healthy and b not in tried]
    if not eligible:
        assert chosen is None
        return
    assert chosen in eligible
    assert chosen.outstanding == min(b.outstanding for b in eligible)
    # Ties go to the earliest in the list, so the choice is deterministic.
    assert chosen is next(b for b in eligible if b.outstanding == chosen.outstanding)


@given(fleets)
def test_choice_does_not_change_the_fleet(spec) -> None:
    backends = _fleet(spec)
    before = [(b.outstanding, b.healthy) for b in backends]
    choose(backends)
    assert [(b.outstanding, b.healthy) for b in backends] == before


def test_a_burst_of_unknown_models_triggers_one_refresh() -> None:
    import asyncio

    from services.gateway.routing import Router

    router = Router(["http://127.0.0.1:9"])
    probes = 0

    async def probe(_: Backend) -> None:
        nonlocal probes
        probes += 1
        await asyncio.sleep(0.01)

    router._probe = probe  # type: ignore[assignment]  # count probes instead of sending them

    async def burst() -> None:
        await asyncio.gather(*(router.refresh_soon() for _ in range(20)))

    asyncio.run(burst())
    assert probes == 1
