"""A classic BPF interpreter for the unit tests of the capture's kernel
filters (capture.bpf_filter, capture.passive_filter): the kernel's
semantics for the opcodes they use; out-of-frame loads reject."""


def run_bpf(prog, pkt):
    """What ``prog`` returns for ``pkt``: ld[bh] abs/ind, ldx imm, st/ld/
    ldx scratch memory, jeq, jset, jgt, jge, and/lsh/rsh #k, add #k/x,
    xor x, tax, txa, ret #k / ret a."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        op, jt, jf, k = prog[pc]
        pc += 1
        if op in (0x28, 0x30, 0x48, 0x50):
            at = k + (x if op & 0x40 else 0)
            size = 2 if op & 0x08 else 1
            if at + size > len(pkt):
                return 0
            a = int.from_bytes(pkt[at:at + size], 'big')
        elif op == 0x01:                    # ldx #k
            x = k
        elif op == 0x02:                    # st M[k]
            mem[k] = a
        elif op == 0x60:                    # ld M[k]
            a = mem[k]
        elif op == 0x61:                    # ldx M[k]
            x = mem[k]
        elif op == 0x15:                    # jeq
            pc += jt if a == k else jf
        elif op == 0x45:                    # jset
            pc += jt if a & k else jf
        elif op == 0x25:                    # jgt
            pc += jt if a > k else jf
        elif op == 0x35:                    # jge
            pc += jt if a >= k else jf
        elif op == 0x54:                    # and #k
            a &= k
        elif op == 0x64:                    # lsh #k
            a = (a << k) & 0xffffffff
        elif op == 0x74:                    # rsh #k
            a >>= k
        elif op == 0xac:                    # xor x
            a ^= x
        elif op == 0x0c:                    # add x
            a = (a + x) & 0xffffffff
        elif op == 0x04:                    # add #k
            a = (a + k) & 0xffffffff
        elif op == 0x07:                    # tax
            x = a
        elif op == 0x87:                    # txa
            a = x
        elif op == 0x06:                    # ret #k
            return k
        elif op == 0x16:                    # ret a
            return a
        else:
            raise AssertionError(f'unexpected BPF op {op:#x}')
