"""The lab's second stage: what is built from the sources. KVM modules rebuilt with a
project patch (modules.py, patches in patches/ described by patch.py), and the static
check of what a built kvm.ko does (kcheck.py)."""
