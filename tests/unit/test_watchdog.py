"""agent.daemon.watchdog: when the daemon may ping systemd. Pure: times are given, not measured."""

from __future__ import annotations

from agent.daemon.watchdog import (
    MAIN_LOOP_BOUND_S,
    LoopState,
    LoopView,
    heartbeat_bound,
    main_loop_bound,
    wedged,
)


def test_heartbeat_bound_covers_a_whole_beat_and_the_wait_before_it() -> None:
    # 10 s interval, a 5 s check, 7 s per store call: 10 + 5 + 8 + 14 + slack
    assert heartbeat_bound(30, 10, [5, 1], 7) == 10 + 5 + 8 + 14 + 10
    # never below the watchdog period
    assert heartbeat_bound(600, 1, [], 1) == 600
    # a slow health check (60 s timeout) is slow, not wedged
    assert heartbeat_bound(30, 10, [60], 7) > 60 + 10


def test_main_loop_bound_covers_its_longest_command() -> None:
    assert main_loop_bound(30) == MAIN_LOOP_BOUND_S >= 120 + 60
    assert main_loop_bound(900) == 900


def test_a_loop_between_tasks_or_inside_a_young_task_is_alive() -> None:
    loops = [LoopView("heartbeat", 20, last_sign=100), LoopView("main", 300, 100, task="backup")]
    assert wedged(loops, now=119) == []


def test_a_heartbeat_stuck_past_its_bound_is_wedged_even_while_the_main_loop_runs() -> None:
    loops = [LoopView("heartbeat", 20, last_sign=100, task="heartbeat"),
             LoopView("main", 300, last_sign=130)]
    why = wedged(loops, now=130)
    assert len(why) == 1 and why[0].startswith("heartbeat loop in task heartbeat"), why


def test_progress_inside_a_long_task_keeps_the_main_loop_alive() -> None:
    long_backup = LoopView("main", 300, last_sign=0, progress=590, task="backup")
    assert wedged([long_backup], now=600) == []
    assert wedged([LoopView("main", 300, last_sign=0, progress=290, task="backup")], 600)


def test_loop_state_marks() -> None:
    s = LoopState("main")
    s.begin("refresh", 5.0)
    assert s.view(10).task == "refresh" and s.view(10).last_sign == 5.0
    s.end(7.0)
    assert s.view(10, progress=8.0) == LoopView("main", 10, 7.0, 8.0, "")
