"""Plan a pod-sized run without allocating it: compile the real steps from abstract shapes on
simulated devices, read XLA's memory analysis, collectives and costs, and set them beside an
analytic estimate and a roofline for named hardware.

    build.py     the abstract state and the compiled train/eval steps
    hlo.py       collectives and buffer shapes from the optimized HLO and XLA's dumps
    loops.py     XLA's cost analysis with each while loop's body counted once per trip
    estimate.py  analytic memory and FLOPs per device
    hardware.py  datasheet figures of the hardware a plan is for
    roofline.py  step time and tokens/s from FLOPs, bytes and collective traffic
    suggest.py   a mesh (or N, or device count) that fits, from the analytic estimate
    report.py    the plan as a dict (the --json output) and as text
"""
