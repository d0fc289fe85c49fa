/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * test-guest low-level entry code (AT&T syntax, assembled by rustc's integrated assembler).
 *
 *  - _start64:  64-bit ELF entry (our VMM: long mode, paging on, RSI = Linux boot_params or 0).
 *  - pvh_start: 32-bit PVH entry (QEMU and other PVH loaders: flat protected mode, paging off,
 *               EBX = hvm_start_info).
 *  - ap_tramp_*: real-mode SIPI trampoline, copied to AP_TRAMPOLINE_ADDR (0x8000, SIPI vector 8).
 *  - interrupt and exception stubs that call into Rust with the SysV ABI.
 *
 * Everything runs at CPL0, which this project's KVM backend emulates instruction by instruction,
 * so the paths here are kept short and only use instructions the emulator implements.
 */

    .set AP_TRAMPOLINE_ADDR, 0x8000
    .set KERNEL_CS, 0x08
    .set KERNEL_DS, 0x10
    .set KERNEL_CS32, 0x18
    .set MSR_EFER, 0xC0000080

/* 32-bit protected mode -> long mode (compatibility until the far jump): PAE, then CR3, then
 * EFER.LME, then paging, the architectural order. Shared by the PVH entry and the AP path. */
.macro ENABLE_LONG_MODE
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $pt_pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
.endm

/* ------------------------------------------------------------------ 64-bit ELF entry */
    .section .text.entry, "ax"
    .code64
    .globl _start64
_start64:
    cli
    movq %rsi, boot_params_ptr(%rip)
    lgdt gdt_ptr(%rip)
    /* Reload CS with our own GDT's code selector. */
    pushq $KERNEL_CS
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    /* Switch to the guest's own identity map (4 GiB, 2 MiB pages). */
    leaq pt_pml4(%rip), %rax
    movq %rax, %cr3
    jmp common64

/* ------------------------------------------------------------------ 32-bit PVH entry */
    .code32
    .globl pvh_start
pvh_start:
    cli
    movl %ebx, pvh_start_info
    lgdt gdt_ptr
    ljmp $KERNEL_CS32, $2f
2:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    ENABLE_LONG_MODE
    ljmp $KERNEL_CS, $common64

    .code64
common64:
    movabsq $bsp_stack_top, %rsp
    xorl %ebp, %ebp
    call kmain
3:  cli
    hlt
    jmp 3b

/* ------------------------------------------------------------------ AP trampoline
 * Copied to AP_TRAMPOLINE_ADDR by the BSP. Entered in real mode with CS = 0x0800, IP = 0.
 * Only position-independent forms or (label - ap_tramp_start + AP_TRAMPOLINE_ADDR) are used.
 */
    .section .rodata.trampoline, "a"
    .code16
    .globl ap_tramp_start
ap_tramp_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (tramp_gdt_ptr - ap_tramp_start + AP_TRAMPOLINE_ADDR)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $KERNEL_CS32, $(tramp32 - ap_tramp_start + AP_TRAMPOLINE_ADDR)
    .code32
tramp32:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    ENABLE_LONG_MODE
    ljmp $KERNEL_CS, $(tramp64 - ap_tramp_start + AP_TRAMPOLINE_ADDR)
    .code64
tramp64:
    movq ap_boot_stack, %rsp
    movq ap_boot_percpu, %rdi
    xorl %ebp, %ebp
    movabsq $ap_main, %rax
    call *%rax
4:  cli
    hlt
    jmp 4b
    .balign 8
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .globl ap_tramp_end
ap_tramp_end:

/* ------------------------------------------------------------------ interrupt stubs */
    .section .text.isr, "ax"
    .code64

/* Save the caller-saved registers, call a Rust handler, restore, iretq.
 * After the 5-word hardware frame RSP is 8 mod 16; nine pushes make it 0 mod 16 for the call. */
.macro IRQ_STUB name, handler
    .globl \name
\name:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    call \handler
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    iretq
.endm

    IRQ_STUB isr_timer, timer_interrupt
    IRQ_STUB isr_wakeup, wakeup_interrupt
    IRQ_STUB isr_sci, sci_interrupt

    .globl isr_spurious
isr_spurious:
    iretq

/* Exceptions: push a dummy error code where the CPU does not, then the vector number. */
.macro EXC_STUB vec
    .if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
    .balign 16
.endm

    .balign 16
    .globl exc_stubs
exc_stubs:
    EXC_STUB 0
    EXC_STUB 1
    EXC_STUB 2
    EXC_STUB 3
    EXC_STUB 4
    EXC_STUB 5
    EXC_STUB 6
    EXC_STUB 7
    EXC_STUB 8
    EXC_STUB 9
    EXC_STUB 10
    EXC_STUB 11
    EXC_STUB 12
    EXC_STUB 13
    EXC_STUB 14
    EXC_STUB 15
    EXC_STUB 16
    EXC_STUB 17
    EXC_STUB 18
    EXC_STUB 19
    EXC_STUB 20
    EXC_STUB 21
    EXC_STUB 22
    EXC_STUB 23
    EXC_STUB 24
    EXC_STUB 25
    EXC_STUB 26
    EXC_STUB 27
    EXC_STUB 28
    EXC_STUB 29
    EXC_STUB 30
    EXC_STUB 31

exc_common:
    /* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. Never returns. */
    movq %rsp, %rdi
    andq $-16, %rsp
    call exception_handler
5:  cli
    hlt
    jmp 5b

/* ------------------------------------------------------------------ data */
    .section .data.boot, "aw"
    .balign 16
    .globl gdt
gdt:
    .quad 0x0000000000000000    /* null */
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0x00cf9a000000ffff    /* 0x18: 32-bit code */
gdt_end:
    .balign 8
    .word 0, 0, 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl boot_params_ptr
boot_params_ptr:
    .quad 0
    .globl pvh_start_info
pvh_start_info:
    .quad 0
    .globl ap_boot_stack
ap_boot_stack:
    .quad 0
    .globl ap_boot_percpu
ap_boot_percpu:
    .quad 0

/* Identity map of the low 4 GiB with 2 MiB pages, built by the assembler (no boot-time loop:
 * every CPL0 instruction costs microseconds here). Covers the LAPIC and IOAPIC windows. */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pt_pml4
pt_pml4:
    .quad pt_pdpt + 0x3
    .fill 511, 8, 0
pt_pdpt:
    .quad pt_pd + 0x3
    .quad pt_pd + 0x1000 + 0x3
    .quad pt_pd + 0x2000 + 0x3
    .quad pt_pd + 0x3000 + 0x3
    .fill 508, 8, 0
pt_pd:
    .set page, 0
    .rept 2048
    .quad (page << 21) | 0x83
    .set page, page + 1
    .endr

/* ------------------------------------------------------------------ PVH ELF note */
    .section .note.pvh, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4
