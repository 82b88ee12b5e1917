"""pytest entry to the conformance suite: one test per API function a backend implements natively.

    pytest -p lowrank.kernels.pytest_plugin --lowrank-backend=mypkg.kernels [--lowrank-max-examples=50]

``--lowrank-backend`` takes what ``check_backend`` takes (a registered name, an import path, a .py
file); each failing test prints that function's rows of the report, shrunk case included.
"""
import pytest


def pytest_addoption(parser):
    group = parser.getgroup("lowrank", "lowrank kernel conformance")
    group.addoption("--lowrank-backend", default=None, metavar="MODULE",
                    help="run the lowrank kernel conformance suite on this backend")
    group.addoption("--lowrank-max-examples", type=int, default=25, metavar="N",
                    help="hypothesis cases per function and dtype (default 25)")


def pytest_collection_modifyitems(session, config, items):
    spec = config.getoption("--lowrank-backend")
    if spec is None:
        return
    from .backends import resolve
    for name in resolve(spec).native:
        items.append(ConformanceItem.from_parent(session, name=f"conformance[{spec}]::{name}",
                                                 spec=spec, function=name))


class ConformanceFailure(AssertionError):
    """The report's rows for one function, failing."""


class ConformanceItem(pytest.Item):
    def __init__(self, *, spec, function, **kwargs):
        super().__init__(**kwargs)
        self.spec, self.function = spec, function

    def runtest(self):
        from .conformance import check_backend
        report = check_backend(self.spec, functions=[self.function],
                               max_examples=self.config.getoption("--lowrank-max-examples"))
        if not report.passed:
            raise ConformanceFailure(str(report))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, self.name
