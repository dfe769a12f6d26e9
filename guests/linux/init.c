/*
 * /init of pyvmm's Linux guest (the linux-microvm workload): the moment user space
 * starts is what a boot-time measurement wants (Firecracker's boot timer, qemu-boot-time's
 * linux_start_user), so the first thing it does is write a marker to an I/O port the
 * tracer in the host watches; then it ends the VM through QEMU's isa-debug-exit device.
 *
 * Built static by the lab (gcc -static -Os); x86 only.
 */
#include <sys/io.h>
#include <unistd.h>

#define INIT_PORT 0x86          /* vmm/layout.py INIT_PORT: "init started" */
#define INIT_MARK 0x1e          /* vmm/layout.py INIT_MARK */
#define DEBUG_EXIT_PORT 0xf4    /* QEMU's isa-debug-exit, iobase=0xf4 */

int main(void)
{
    if (ioperm(INIT_PORT, 1, 1) == 0)
        outb(INIT_MARK, INIT_PORT);
    if (ioperm(DEBUG_EXIT_PORT, 1, 1) == 0)
        outb(0, DEBUG_EXIT_PORT);       /* QEMU exits with status 1 */
    for (;;)
        pause();
    return 0;
}
