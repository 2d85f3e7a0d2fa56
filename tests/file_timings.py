"""pytest plugin (tools/run_tests.sh loads it with ``-p file_timings``): after the run, each test
file's wall time (setup + call + teardown of its tests, module fixtures included), slowest first,
so the suite's budget can be read off one table."""
from collections import defaultdict


class FileTimer:
    def __init__(self):
        self.seconds = defaultdict(float)
        self.tests = defaultdict(int)

    def pytest_runtest_logreport(self, report):
        path = report.nodeid.split("::")[0]
        self.seconds[path] += report.duration
        if report.when == "call" or (report.when == "setup" and report.skipped):
            self.tests[path] += 1

    def pytest_terminal_summary(self, terminalreporter):
        if not self.seconds:
            return
        terminalreporter.section("time per test file")
        for path, s in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{s:8.1f} s  {self.tests[path]:4d} tests  {path}")
        terminalreporter.write_line(f"{sum(self.seconds.values()):8.1f} s  total")


def pytest_configure(config):
    config.pluginmanager.register(FileTimer(), "file_timer")
