/*
 * The micro guest: a deterministic memory-write workload, entered by the VMM in 64-bit long
 * mode at CPL0 (see guest_abi::layout::MICRO_LOAD_GPA and the crate docs for the entry state).
 *
 * Labels are plain (not .L) so that they name the blocks in micro.lst (OUT_DIR) when a guest
 * stops at some RIP.
 *
 * Position independent: the only reference to the payload itself is RIP-relative (the CPL3
 * entry point). Every other address is a fixed guest-physical address from guest_abi, whose
 * values build.rs writes to abi.inc. Assembled with `as --64` and copied out as a flat binary,
 * so there is no linker and no relocation (build.rs checks that).
 *
 * CPL0 code runs in KVM's instruction emulator on PVM hosts (slow, and some instructions cannot
 * be emulated at all), so it only checks the mailbox header, grants CPL3 the ports it needs
 * (TSS I/O bitmap, see there) and drops to CPL3 with iretq. The workload loop runs at CPL3,
 * natively. IF stays 0 throughout, so the empty IDT is never consulted unless something faults
 * (then the guest triple-faults).
 *
 * Several vCPUs (guest_abi::micro docs): every vCPU enters here with its index in RSI (0 for the
 * BSP) and its own CPL0 stack. Only vCPU 0 sets up the TSS I/O bitmap and reloads TR; the VMM
 * has done both for the others (their TR is loaded with the bitmap-covering limit, and the
 * bitmap bytes are already in the TSS), so there is nothing to wait for. Each vCPU gets its own
 * CPL3 stack, private region, seed and mailbox progress slot.
 *
 * The reference model in src/model.rs must match this loop write for write.
 */
        .include "abi.inc"

        .code64
        .text

/* ---------------------------------------------------------------- CPL0 */
entry:
        /* Header check. 0x6000-style absolute addresses are disp32 operands, not RIP-relative. */
        movabs  $MICRO_MAGIC, %rax
        cmp     %rax, MAILBOX + OFF_MAGIC
        jne     bad_magic
        cmpq    $MICRO_VERSION, MAILBOX + OFF_VERSION
        jne     bad_version

        /* vCPUs other than 0 find the TSS and TR set up by the VMM. */
        test    %rsi, %rsi
        jnz     to_user

        /* Let CPL3 use the exit and pass ports through the TSS I/O permission bitmap. IOPL=3 in
         * RFLAGS (below) is enough on hardware, but PVM clears IOPL on the way to CPL3 (seen
         * on this project's hosts), and an `out` then consults the bitmap; without one it is a
         * #GP and, with no IDT, a triple fault. The VMM's TSS has no bitmap and its TR limit
         * covers none, so give the TSS one (all zero: ports 0..IOPB_BYTES*8-1 allowed, then the
         * 0xff end byte the CPU expects), rewrite its descriptor with the larger limit as an
         * available TSS, and load TR again. */
        movw    $TSS_IOPB_OFFSET, TSS + 102
        lea     TSS + TSS_IOPB_OFFSET, %rdi
        mov     $IOPB_BYTES / 8, %ecx
        xor     %eax, %eax
        rep stosq
        movb    $0xff, (%rdi)
        movabs  $TSS_DESC_LO, %rax
        mov     %rax, GDT + TSS_SEL
        movq    $TSS_DESC_HI, GDT + TSS_SEL + 8
        mov     $TSS_SEL, %eax
        ltr     %ax

to_user:
        /* CPL3 stack: USER_STACK_TOP - (index & 0xff) * stride. RSI survives the iretq. */
        movzbl  %sil, %eax
        shl     $USER_STACK_SHIFT, %eax
        mov     $USER_STACK_TOP, %ecx
        sub     %rax, %rcx
        /* iretq frame, pushed in reverse of pop order (RIP, CS, RFLAGS, RSP, SS): SS first. */
        pushq   $USER_DS
        push    %rcx
        pushq   $USER_RFLAGS
        pushq   $USER_CS
        lea     user_entry(%rip), %rax
        push    %rax
        iretq

bad_magic:
        mov     $EXIT_BAD_MAGIC, %eax
        jmp     cpl0_exit
bad_version:
        mov     $EXIT_BAD_VERSION, %eax
cpl0_exit:
        /* Port value: index << 24 | status (guest_abi::micro::port_value). */
        movzbl  %sil, %ecx
        shl     $PORT_VALUE_BITS, %ecx
        or      %ecx, %eax
        mov     $PORT_EXIT, %dx
        out     %eax, %dx
        /* The VMM stops at the exit port; should it resume us, halt (IF=0) rather than run on. */
1:      hlt
        jmp     1b

/* ---------------------------------------------------------------- CPL3 */
/*
 * Registers for the whole run:
 *   r8  this vCPU's private region GPA
 *   r9  logical pages (private + shared)   r10 pattern
 *   r13 PRNG state
 *   r14 pass (from 1)         r15 writes per pass    rsi sparse stride (param, 0 -> 1)
 *   rdi hot-set size          rbp value tag: pass << 32 ^ index << 56
 *   rcx write index i within the pass                r12 this vCPU's frame (below)
 *   rax, rdx, rbx scratch (div uses rdx:rax; rbx holds its divisor 10)
 * The budget (passes, 0 = forever) is in no register: it is read from the mailbox after each
 * pass (pass_done).
 * No stack use: nothing here calls or pushes, so no page but the mailbox and the regions is
 * ever written at CPL3. This vCPU's constants live in its frame in the mailbox page (which
 * every pass writes anyway), at MAILBOX + OFF_VCPU_FRAME + index * VCPU_FRAME_SIZE:
 */
        .set    FR_PRIVATE_PAGES, 0     /* logical pages below this are private */
        .set    FR_SHARED_SLOT, 8       /* shared GPA + 8 * index */
        .set    FR_VALUE_TAG, 16        /* index << 56 */
        .set    FR_PORT_TAG, 24         /* index << 24 */
        .set    FR_PASS_FIELD, 32       /* address of this vCPU's mailbox pass field */
        .set    FR_INDEX, 40            /* vCPU index */
        .set    FR_SIZE, 48             /* <= VCPU_FRAME_SIZE (build.rs checks 48) */
user_entry:
        /* The vCPU index first, as this vCPU's frame depends on it: count (0 -> 1) <=
         * MAX_VCPUS, index (RSI) < count. */
        mov     MAILBOX + OFF_VCPUS, %rdi
        test    %rdi, %rdi
        jnz     1f
        mov     $1, %edi
1:
        cmp     $MAX_VCPUS, %rdi
        ja      bad_vcpu
        cmp     %rdi, %rsi
        jae     bad_vcpu
        mov     %rsi, %rbx              /* index, < MAX_VCPUS */
        mov     %rbx, %r12
        shl     $VCPU_FRAME_SHIFT, %r12
        add     $MAILBOX + OFF_VCPU_FRAME, %r12
        mov     %rbx, FR_INDEX(%r12)
        mov     %rbx, %rax
        shl     $PORT_VALUE_BITS, %rax
        mov     %rax, FR_PORT_TAG(%r12)

        mov     MAILBOX + OFF_REGION_GPA, %r8
        mov     MAILBOX + OFF_REGION_PAGES, %r9
        mov     MAILBOX + OFF_PATTERN, %r10

        /* Reject what would make the loop fault: an unknown pattern, no pages, or a region
         * outside the identity map. Every store then lands inside the map: at a private
         * region + page * 4096 with page < pages, or in the shared region. */
        mov     $EXIT_BAD_PATTERN, %eax
        cmp     $PATTERN_SPARSE, %r10
        ja      cpl3_exit
        mov     $EXIT_BAD_REGION, %eax
        test    %r9, %r9
        jz      cpl3_exit
        /* pages <= map size / 4096, so that pages << 12 (times count <= 8) cannot overflow. */
        mov     $IDENTITY_MAP_PAGES, %edx
        cmp     %rdx, %r9
        ja      cpl3_exit
        /* Private regions: [region, region + count * (pages << 12)) inside the map. */
        mov     %r9, %rdx
        shl     $12, %rdx
        imul    %rdi, %rdx
        add     %r8, %rdx
        jc      cpl3_exit
        movabs  $IDENTITY_MAP_END, %rcx
        cmp     %rcx, %rdx
        ja      cpl3_exit
        /* This vCPU's: region + index * (pages << 12). */
        mov     %r9, %rdx
        shl     $12, %rdx
        imul    %rbx, %rdx
        add     %rdx, %r8
        /* Shared region: none, or [shared, shared + (shared_pages << 12)) inside the map. */
        mov     MAILBOX + OFF_SHARED_PAGES, %rdi
        test    %rdi, %rdi
        jz      1f
        mov     $IDENTITY_MAP_PAGES, %edx
        cmp     %rdx, %rdi
        ja      cpl3_exit
        mov     %rdi, %rdx
        shl     $12, %rdx
        add     MAILBOX + OFF_SHARED_GPA, %rdx
        jc      cpl3_exit
        cmp     %rcx, %rdx
        ja      cpl3_exit
1:
        /* The frame. */
        mov     %r9, FR_PRIVATE_PAGES(%r12)
        add     %rdi, %r9               /* logical pages: private + shared */
        mov     MAILBOX + OFF_SHARED_GPA, %rax
        lea     (%rax, %rbx, 8), %rax
        mov     %rax, FR_SHARED_SLOT(%r12)
        mov     %rbx, %rax
        shl     $56, %rax
        mov     %rax, FR_VALUE_TAG(%r12)
        lea     MAILBOX + OFF_VCPU_PASS(, %rbx, 8), %rax
        mov     %rax, FR_PASS_FIELD(%r12)

        /* Seed: seed + index * SEED_STRIDE (guest_abi::micro::vcpu_seed); 0 would keep
         * xorshift64 at 0 forever: use 1. */
        movabs  $SEED_STRIDE, %r13
        imul    %rbx, %r13
        add     MAILBOX + OFF_SEED, %r13
        test    %r13, %r13
        jnz     1f
        mov     $1, %r13d
1:
        /* Sparse stride: param, 0 -> 1. */
        mov     MAILBOX + OFF_PARAM, %rsi
        test    %rsi, %rsi
        jnz     1f
        mov     $1, %esi
1:
        /* Hot set: max(1, pages / 10). */
        mov     %r9, %rax
        xor     %edx, %edx
        mov     $10, %ebx
        div     %rbx
        mov     %rax, %rdi
        test    %rdi, %rdi
        jnz     1f
        mov     $1, %edi
1:
        /* Writes per pass (guest_abi::micro::writes_per_pass). */
        mov     %r9, %r15
        cmp     $PATTERN_SWEEP, %r10
        je      2f
        mov     MAILBOX + OFF_PARAM, %r15
        cmp     $PATTERN_HOTSET, %r10
        jbe     2f
        /* Sparse: ceil(pages / stride), as quotient + (remainder != 0): no overflow. */
        mov     %r9, %rax
        xor     %edx, %edx
        div     %rsi
        mov     %rax, %r15
        test    %rdx, %rdx
        jz      2f
        inc     %r15
2:
        xor     %r14d, %r14d

pass_loop:
        inc     %r14
        mov     FR_PASS_FIELD(%r12), %rax
        mov     %r14, (%rax)
        cmpq    $0, FR_INDEX(%r12)
        jne     1f
        mov     %r14, MAILBOX + OFF_CURRENT_PASS
1:
        mov     %r14, %rbp
        shl     $32, %rbp
        xor     FR_VALUE_TAG(%r12), %rbp
        xor     %ecx, %ecx
        test    %r15, %r15
        jz      pass_done

write_loop:
        /* Page index into rax (guest_abi::micro::page_for). */
        cmp     $PATTERN_SWEEP, %r10
        jne     1f
        mov     %rcx, %rax
        jmp     store
1:
        cmp     $PATTERN_SPARSE, %r10
        jne     random_or_hot
        mov     %rcx, %rax
        imul    %rsi, %rax
        jmp     store

random_or_hot:
        /* Advance the PRNG before the write: x ^= x << 13; x ^= x >> 7; x ^= x << 17. */
        mov     %r13, %rax
        shl     $13, %rax
        xor     %rax, %r13
        mov     %r13, %rax
        shr     $7, %rax
        xor     %rax, %r13
        mov     %r13, %rax
        shl     $17, %rax
        xor     %rax, %r13

        cmp     $PATTERN_RANDOM, %r10
        jne     hotset
        /* rng % pages */
        mov     %r13, %rax
        xor     %edx, %edx
        div     %r9
        mov     %rdx, %rax
        jmp     store

hotset:
        /* rng % 10 != 0 -> (rng / 16) % hot, else (rng / 16) % pages */
        mov     %r13, %rax
        xor     %edx, %edx
        div     %rbx
        mov     %r13, %rax
        shr     $4, %rax
        test    %rdx, %rdx
        jz      hotset_cold
        xor     %edx, %edx
        div     %rdi
        mov     %rdx, %rax
        jmp     store
hotset_cold:
        xor     %edx, %edx
        div     %r9
        mov     %rdx, %rax

store:
        /* Address: a private page (offset 0) or this vCPU's slot of a shared page. */
        cmp     FR_PRIVATE_PAGES(%r12), %rax
        jae     shared_store
        shl     $12, %rax
        add     %r8, %rax
store_value:
        /* store_value_for(index, pass, i) = (pass << 32 | (u32)i) ^ index << 56 */
        mov     %ecx, %edx
        or      %rbp, %rdx
        mov     %rdx, (%rax)
        inc     %rcx
        cmp     %r15, %rcx
        jb      write_loop
        jmp     pass_done
shared_store:
        sub     FR_PRIVATE_PAGES(%r12), %rax
        shl     $12, %rax
        add     FR_SHARED_SLOT(%r12), %rax
        jmp     store_value

pass_done:
        /* Port value: index << 24 | pass mod 2^24 (guest_abi::micro::port_value). */
        mov     $PORT_PASS, %dx
        mov     %r14d, %eax
        and     $(1 << PORT_VALUE_BITS) - 1, %eax
        or      FR_PORT_TAG(%r12), %eax
        out     %eax, %dx
        /* The budget (0 = forever), read again after every pass: the VMM may set or change it
         * while the guest runs (`vmm remote finish`), with every vCPU paused and at most at
         * the new budget, so each vCPU then ends after exactly that many passes and the final
         * memory depends only on the workload and the final budget. */
        mov     MAILBOX + OFF_PASSES, %rax
        dec     %rax                    /* 0 (forever) becomes 2^64 - 1: above every pass */
        cmp     %rax, %r14
        jbe     pass_loop               /* pass <= budget - 1: not done */

        xor     %eax, %eax              /* EXIT_OK */
cpl3_exit:
        or      FR_PORT_TAG(%r12), %eax
        jmp     exit_loop
bad_vcpu:
        /* No frame: the port tag from RSI directly. */
        mov     $EXIT_BAD_VCPU, %eax
        movzbl  %sil, %ecx
        shl     $PORT_VALUE_BITS, %ecx
        or      %ecx, %eax
exit_loop:
        mov     $PORT_EXIT, %dx
        /* The VMM stops the vCPU at the exit port. hlt would #GP at CPL3, so report again
         * instead: a vCPU resumed after its exit (say, on a migration destination) ends at once. */
1:      out     %eax, %dx
        jmp     1b
