"""The live view: counts, best point on ID validation and ETA; redrawn in place on a
terminal, plain lines (never a repeated one) in a log."""
import io

from orchestrator.run.live import LiveView


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_count_trials_show_the_best_point_and_the_eta():
    clock, out = Clock(), io.StringIO()
    live = LiveView(out, every_s=15, clock=clock)
    live.start("train", 4)
    for _ in range(2):
        live.trial_started()
    clock.now += 10
    live.trial_ended(ok=True)          # quiet: under every_s since the first line
    clock.now += 30
    live.point(0.80, "ft-00 alpha=0.5")
    live.point(0.75, "ft-00 alpha=0.2")   # worse: not shown
    live.trial_ended(ok=False)
    lines = out.getvalue().splitlines()
    assert lines[0] == ("[train] 0/4 done · 0 running · 0 failed · best on ID val: none yet"
                        " · elapsed 0s")
    # 40 s for 2 finished trials: 40 s more for the other 2
    assert lines[1] == ("[train] 1/4 done · 0 running · 1 failed · best on ID val: "
                        "ft-00 alpha=0.5 (80.0) · elapsed 40s · ETA 40s")
    assert len(lines) == 2


def test_the_end_of_a_stage_is_printed_once_in_a_log():
    clock, out = Clock(), io.StringIO()
    live = LiveView(out, every_s=15, clock=clock)
    live.start("ensemble", 1)
    live.trial_started()
    clock.now += 65
    live.trial_ended(ok=True)          # the last one: always printed
    live.finish()
    lines = out.getvalue().splitlines()
    assert lines[-1] == "[ensemble] 1/1 done · 0 running · 0 failed · best on ID val: none yet · elapsed 1m05s"
    assert len(lines) == 2


def test_on_a_terminal_the_line_is_redrawn_in_place_and_other_output_goes_above(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")     # wider than the line, whatever runs the suite
    clock, term = Clock(), Terminal()
    live = LiveView(term, clock=clock)
    live.start("train", 2)
    live.trial_started()
    live.echo("[features] done in 3s")
    live.trial_ended(ok=True)
    live.finish()
    text = term.getvalue()
    # every redraw clears the line and starts at column 0; no newline between redraws
    frames = text.split("\r\x1b[2K")[1:]
    assert frames[0] == "[train] 0/2 done · 0 running · 0 failed · best on ID val: none yet · elapsed 0s"
    assert "[features] done in 3s\n" in frames          # printed on its own line ...
    after = frames[frames.index("[features] done in 3s\n") + 1]
    assert after.startswith("[train] 0/2 done · 1 running")   # ... and the live line comes back
    assert text.endswith("[train] 1/2 done · 0 running · 0 failed · best on ID val: none yet"
                         " · elapsed 0s · ETA 0s\n")


def test_on_a_narrow_terminal_the_line_is_cut_to_its_width(monkeypatch):
    """A line longer than the terminal would wrap, and `\r` would then redraw only its
    last row: it is cut one column short of the width instead."""
    monkeypatch.setenv("COLUMNS", "40")
    term = Terminal()
    live = LiveView(term, clock=Clock())
    live.start("train", 2)
    frames = term.getvalue().split("\r\x1b[2K")[1:]
    assert frames and all(len(f) == 39 for f in frames), frames
