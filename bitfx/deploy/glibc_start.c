/* Program start-up for aarch64 glibc that binds __libc_start_main@GLIBC_2.17 (every aarch64 glibc).
 *
 * glibc 2.34 moved __libc_start_main to a new symbol version, and the Scrt1.o of a newer toolchain
 * references GLIBC_2.34: a program linked with it refuses to start on glibc 2.27/2.28 (Ubuntu 18.04,
 * Debian 10) with "version `GLIBC_2.34' not found". Linking with `-nostartfiles` and this file
 * instead of Scrt1.o keeps the loader's needs at GLIBC_2.17:
 *
 *   aarch64-linux-gnu-g++ -nostartfiles $(crti.o crtbeginS.o) glibc_start.c loader.cc ... $(crtendS.o crtn.o)
 *
 * Before 2.34, __libc_start_main ran the program's constructors through the `init` argument (the
 * dynamic linker runs those of the libraries, not the executable's); since 2.34 the compat symbol
 * still calls `init` when it is not NULL. So `bitfx_start_init` runs .init_array, on both.
 * The executable's destructors (.fini_array) are run by the dynamic linker on every version.
 */
#if !defined(__aarch64__) || !defined(__linux__)
#error "glibc_start.c is the start-up code of aarch64 Linux (glibc) programs only"
#endif

typedef void (*bitfx_init_fn)(int, char**, char**);
extern bitfx_init_fn __init_array_start[] __attribute__((visibility("hidden")));
extern bitfx_init_fn __init_array_end[] __attribute__((visibility("hidden")));

__attribute__((used, visibility("hidden"))) void bitfx_start_init(int argc, char** argv,
                                                                   char** envp) {
  unsigned long n = (unsigned long)(__init_array_end - __init_array_start);
  for (unsigned long i = 0; i < n; ++i) __init_array_start[i](argc, argv, envp);
}

/* x0 = rtld_fini (from the dynamic linker), [sp] = argc, sp + 8 = argv; as glibc's start.S. */
__asm__(
    ".symver bitfx_libc_start_main, __libc_start_main@GLIBC_2.17\n"
    ".text\n"
    ".globl _start\n"
    ".type _start, %function\n"
    "_start:\n"
    "  mov x29, #0\n"
    "  mov x30, #0\n"
    "  mov x5, x0\n"
    "  ldr x1, [sp]\n"
    "  add x2, sp, #8\n"
    "  mov x6, sp\n"
    "  adrp x0, :got:main\n"
    "  ldr x0, [x0, #:got_lo12:main]\n"
    "  adrp x3, bitfx_start_init\n"
    "  add x3, x3, #:lo12:bitfx_start_init\n"
    "  mov x4, #0\n"
    "  bl bitfx_libc_start_main\n"
    "  brk #0x1000\n"
    ".size _start, .-_start\n");
