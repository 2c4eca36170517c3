"""Many users at once, and how fast the routing page redraws.

Eight browser contexts (eight Streamlit sessions) work different pages for 60 s: each round every
user flips one setting, then every user waits for its own run. Two users share each of four pages
with different settings, so a result leaking between sessions through a cache or a module global
shows up as the wrong setting or the wrong figure. Latency is measured in the page (from the
action to the end of the run it started); median and p95 are printed and written to
artifacts/latency.json. No assertion on time: the numbers are for the report.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import pytest

from tests import browser_support as bs

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DURATION_S = 60.0
STALL_S = 30.0  # a change with no finished run after this long counts as a stall


@dataclasses.dataclass
class User:
    """One browser session: a page, a cold link, and one widget flipped between two values."""

    path: str
    query: dict
    key: str
    values: tuple
    figures: int
    page: object = None
    turn: int = 0

    @property
    def target(self):
        return self.values[self.turn % 2]


USERS = [
    User("routing", {"E": 32, "T": 16384, "R": 4}, "E", (16, 32), 3),
    User("routing", {"E": 64, "T": 8192, "R": 8, "wl": "uniform"}, "k", (1, 2), 3),
    User("expert-parallel", {"experts": 32, "ranks": 4, "tokens": 1024}, "ranks", (2, 4), 3),
    User("expert-parallel", {"experts": 16, "ranks": 2, "tokens": 512}, "k", (1, 2), 3),
    User("scaling", {"src": "bnsl_4digit", "seed": 3}, "seed", (4, 3), 3),
    User("scaling", {"src": "bnsl_4digit", "seed": 10}, "seed", (11, 10), 3),
    User("cost", {"experts": 16, "k": 4}, "k", (1, 4), 1),
    User("cost", {"preset": "Llama-2-7B", "layers": 16}, "layers", (8, 16), 1),
]



def _check(user: User) -> None:
    """The user's own setting is on screen and in the URL, and nothing went wrong."""
    assert bs.exceptions(user.page) == [] and bs.errors(user.page) == [], user.path
    assert float(bs.widget_value(user.page, user.key)) == float(user.target), (user.path, user.key)
    assert bs.query_of(user.page).get(user.key, str(user.target)) == str(user.target)
    for key, value in user.query.items():
        if key != user.key:
            assert bs.query_of(user.page).get(key, str(value)) == str(value), (user.path, key)


def _wait_first_run(page, figures: int) -> None:
    """After a goto fired for all users together: wait for this page's first run and charts."""
    bs.wait_for_run(page, 0, timeout_s=120)
    bs.wait_for_render(page, figures, timeout_s=120)


def test_eight_users_for_a_minute(browser, server):
    users = [dataclasses.replace(u) for u in USERS]
    latencies: list[float] = []
    stalls: list[str] = []
    t_setup = time.monotonic()
    try:
        for u in users:
            u.page = bs.new_app_page(browser)
            u.page.goto(bs.page_url(server, u.path, u.query))
        for u in users:
            _wait_first_run(u.page, u.figures)
            assert bs.exceptions(u.page) == [], u.path

        setup_s = time.monotonic() - t_setup
        rounds = 0
        t_loop = time.monotonic()
        deadline = t_loop + DURATION_S
        while time.monotonic() < deadline:
            starts = []
            for u in users:  # every session gets its input before any is waited for
                starts.append((*u.page.evaluate("[window.__st.done, performance.now()]"),
                               bs.server_runs(u.page), bs.figures_now(u.page)))
                bs.set_widget(u.page, u.key, u.target)
            for u, (done, t0, served, figs) in zip(users, starts):
                try:
                    bs.wait_for_run(u.page, done, timeout_s=STALL_S)
                    latencies.append(u.page.evaluate("window.__st.t") - t0)
                except AssertionError as exc:
                    # Counted and reported, then the user reloads, as a person would.
                    stalls.append(f"{exc}; runs the server finished since the change: "
                                  f"{bs.server_runs(u.page) - served}; URL {bs.query_of(u.page)}")
                    u.page.reload()
                    _wait_first_run(u.page, u.figures)
                # The page shows the new setting's figures (every change here redraws one).
                assert bs.wait_for_render(u.page, u.figures, timeout_s=60) != figs, u.page.url
                _check(u)
                u.turn += 1
            rounds += 1
        # Undo the last turn's advance: each page now shows values[(turn - 1) % 2].
        for u in users:
            u.turn -= 1

        loop_s = time.monotonic() - t_loop
        # Each session's figures are its own: reloading its URL (a new session, warm browser
        # cache) draws exactly the same.
        shown = [bs.figures(u.page) for u in users]
        for u in users:
            u.page.reload()
        for u, figs in zip(users, shown):
            _wait_first_run(u.page, u.figures)
            assert bs.figures(u.page) == figs, u.page.url
        verify_s = time.monotonic() - t_loop - loop_s
        batched = sum(u.page.evaluate("window.__st.batched") for u in users)
    finally:
        for u in users:
            if u.page is not None:
                u.page.context.close()

    med = statistics.median(latencies)
    p95 = sorted(latencies)[max(0, round(0.95 * len(latencies)) - 1)]
    print(f"\n8 users, {rounds} rounds, {len(latencies)} interactions: "
          f"median {med:.0f} ms, p95 {p95:.0f} ms (setup {setup_s:.0f} s, loop {loop_s:.0f} s, "
          f"reload check {verify_s:.0f} s); runs seen only on the websocket {batched}; "
          f"stalls {len(stalls)}: {stalls}")
    bs.write_json("latency.json", {"users": len(users), "duration_s": DURATION_S, "rounds": rounds,
                                   "interactions": len(latencies), "median_ms": med, "p95_ms": p95,
                                   "stalls": stalls, "batched_runs": batched, "setup_s": setup_s, "loop_s": loop_s, "reload_check_s": verify_s,
                                   "latencies_ms": latencies})
    assert rounds >= 2
    # No stall is tolerated. The earlier one in twenty to thirty was the run counter's: a fast
    # run's messages rendered in one React batch never show data-test-script-state='running',
    # though the page shows the run (docs/run_state_batching.md); the counter now also reads the
    # page's websocket, and the figures check above reads what the page shows.
    assert stalls == [], stalls


def test_routing_redraw_time_at_defaults(page, server):
    """Routing page at default settings: a change that recomputes (Zipf s 1.0 -> 1.05) and one
    served from the cache (order by id). Times are printed and written, not asserted."""
    bs.open_page(page, server, "routing", figures=3)
    before = bs.figures(page)
    recompute_ms = bs.timed_rerun(page, lambda: bs.set_widget(page, "s", 1.05), figures=3)
    changed = bs.figures(page)
    assert changed != before and bs.errors(page) == [] and bs.exceptions(page) == []
    cached_ms = bs.timed_rerun(page, lambda: bs.set_widget(page, "order", "by id"), figures=3)
    assert bs.figures(page) != changed and bs.exceptions(page) == []
    print(f"\nrouting redraw at defaults: recompute {recompute_ms:.0f} ms, "
          f"cached {cached_ms:.0f} ms")
    bs.write_json("routing_redraw.json", {"recompute_ms": recompute_ms, "cached_ms": cached_ms,
                                          "change": "zipf s 1.0 -> 1.05; order sorted -> by id"})
