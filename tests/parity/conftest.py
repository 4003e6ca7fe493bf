"""tests/parity: every comparison's ratio error / tolerance, reported with ``--parity-ratios``.

Comparisons written with :func:`tests.parity.tolerances.within` record their ratio always; with
``--parity-ratios`` the ``numpy.testing.assert_allclose`` calls are recorded too. After each test
its largest ratios go into the report's ``user_properties`` (so that they reach the controller
under pytest-xdist), and tests/conftest.py prints and writes the table at the end.
"""

import numpy as np
import pytest

from tests.parity import tolerances


@pytest.fixture(autouse=True)
def _record_parity_ratios(request, monkeypatch):
    tolerances.RECORDS.clear()
    if request.config.getoption("--parity-ratios"):
        original = np.testing.assert_allclose

        def recording(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
            err_msg = kwargs.get("err_msg", args[1] if len(args) > 1 else "")
            what = (f"assert_allclose(rtol={np.max(rtol):g}, atol={np.max(atol):g}) "
                    f"{err_msg}").strip()
            tolerances.RECORDS.append(
                (what, tolerances.allclose_ratio(actual, desired, rtol=rtol, atol=atol)))
            return original(actual, desired, rtol, atol, *args, **kwargs)

        monkeypatch.setattr(np.testing, "assert_allclose", recording)
    yield
    request.node.user_properties.extend(
        ("parity_ratio", (what, ratio)) for what, ratio in tolerances.RECORDS)
    tolerances.RECORDS.clear()
