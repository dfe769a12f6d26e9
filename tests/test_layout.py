"""guests/protocol.inc and pyvmm/vmm/layout.py must agree on every shared constant."""

import os
import re

from pyvmm.vmm import layout

PROTOCOL = os.path.join(os.path.dirname(__file__), "..", "guests", "protocol.inc")


def test_protocol_inc_matches_layout():
    with open(PROTOCOL) as f:
        defines = dict(re.findall(r"^#define\s+(\w+)\s+(\S+)", f.read(), re.M))
    assert len(defines) > 20
    for name, value in defines.items():
        assert hasattr(layout, name), f"{name} is in protocol.inc but not in layout.py"
        assert getattr(layout, name) == int(value, 0), name


def test_layout_regions_do_not_overlap():
    regions = [(layout.GDT_GPA, 0x1000), (layout.PML4_GPA, 0x1000), (layout.PDPT_GPA, 0x1000),
               (layout.PD_GPA, 0x4000), (layout.PARAM_GPA, layout.PARAM_AREA_SIZE),
               (layout.CODE_GPA, 0x10000)]
    regions.sort()
    for (a, la), (b, _) in zip(regions, regions[1:]):
        assert a + la <= b
    assert layout.STACK_TOP <= layout.RAM_SIZE
    top = layout.DOORBELL_BASE + layout.DOORBELL_STRIDE * layout.PARAM_MAX_DOORBELLS
    assert layout.RAM_SIZE <= layout.DOORBELL_BASE and top <= layout.BAR_GPA


def test_the_linux_guests_init_writes_the_port_the_trace_watches():
    path = os.path.join(os.path.dirname(__file__), "..", "guests", "linux", "init.c")
    with open(path) as f:
        defines = dict(re.findall(r"^#define\s+(\w+)\s+(\S+)", f.read(), re.M))
    assert int(defines["INIT_PORT"], 0) == layout.INIT_PORT
    assert int(defines["INIT_MARK"], 0) == layout.INIT_MARK
