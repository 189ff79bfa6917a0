"""What Android's bionic provides to a shared library, for checking links made without an NDK.

Names checked against bionic's own export maps (``libc/libc.map.txt``, ``libm/libm.map.txt``,
``libdl/libdl.map.txt`` in AOSP), arm64, available at API level 24 or lower. ``LIBM`` is that map's
whole base version; ``LIBC`` is the part of libc that compiled kernels and their C glue can
plausibly call (memory, strings, formatted output, math helpers, threads, time, errno, the stack
protector, atexit). A symbol outside these sets is not necessarily missing from bionic, but bitfx
refuses to guess: extend the set here, with a look at the map, when a real kernel needs one.
"""

LIBDL = frozenset({"android_dlopen_ext", "dl_iterate_phdr", "dladdr", "dlclose", "dlerror",
                   "dlopen", "dlsym"})

LIBM = frozenset("""
__fe_dfl_env __signbit __signbitf __signbitl acos acosf acosh acoshf acoshl acosl asin asinf asinh
asinhf asinhl asinl atan atan2 atan2f atan2l atanf atanh atanhf atanhl atanl cabs cabsf cabsl cacos
cacosf cacosh cacoshf carg cargf cargl casin casinf casinh casinhf catan catanf catanh catanhf cbrt
cbrtf cbrtl ccos ccosf ccosh ccoshf ceil ceilf ceill cexp cexpf cimag cimagf cimagl conj conjf conjl
copysign copysignf copysignl cos cosf cosh coshf coshl cosl cproj cprojf cprojl creal crealf creall
csin csinf csinh csinhf csqrt csqrtf csqrtl ctan ctanf ctanh ctanhf drem dremf erf erfc erfcf erfcl
erff erfl exp exp2 exp2f exp2l expf expl expm1 expm1f expm1l fabs fabsf fabsl fdim fdimf fdiml
feclearexcept fedisableexcept feenableexcept fegetenv fegetexcept fegetexceptflag fegetround
feholdexcept feraiseexcept fesetenv fesetexceptflag fesetround fetestexcept feupdateenv finite
finitef floor floorf floorl fma fmaf fmal fmax fmaxf fmaxl fmin fminf fminl fmod fmodf fmodl frexp
frexpf frexpl gamma gamma_r gammaf gammaf_r hypot hypotf hypotl ilogb ilogbf ilogbl j0 j0f j1 j1f
jn jnf ldexpf ldexpl lgamma lgamma_r lgammaf lgammaf_r lgammal lgammal_r llrint llrintf llrintl
llround llroundf llroundl log log10 log10f log10l log1p log1pf log1pl log2 log2f log2l logb logbf
logbl logf logl lrint lrintf lrintl lround lroundf lroundl modf modff modfl nan nanf nanl nearbyint
nearbyintf nearbyintl nextafter nextafterf nextafterl nexttoward nexttowardf nexttowardl pow powf
powl remainder remainderf remainderl remquo remquof remquol rint rintf rintl round roundf roundl
scalb scalbf scalbln scalblnf scalblnl scalbn scalbnf scalbnl signgam significand significandf
significandl sin sincos sincosf sincosl sinf sinh sinhf sinhl sinl sqrt sqrtf sqrtl tan tanf tanh
tanhf tanhl tanl tgamma tgammaf tgammal trunc truncf truncl y0 y0f y1 y1f yn ynf
""".split())

LIBC = frozenset("""
__assert __assert2 __cxa_atexit __cxa_finalize __errno __fpclassify __fpclassifyd __fpclassifyf
__fpclassifyl __isfinite __isfinitef __isinf __isinff __isnan __isnanf __memcpy_chk __memmove_chk
__memset_chk __snprintf_chk __sprintf_chk __stack_chk_fail __strlen_chk __vsnprintf_chk _exit
abort abs atoi atol atoll bsearch calloc clock clock_gettime close exit fclose fflush fopen fprintf
fputc fputs fread free fwrite getenv getpid gettid gettimeofday isfinite isinf isnan isnanf labs
ldexp llabs lseek madvise malloc malloc_usable_size memalign memchr memcmp memcpy memmove memset
mmap munmap nanosleep open posix_memalign printf pthread_attr_destroy pthread_attr_init
pthread_attr_setstacksize pthread_cond_broadcast pthread_cond_destroy pthread_cond_init
pthread_cond_signal pthread_cond_timedwait pthread_cond_wait pthread_create pthread_detach
pthread_equal pthread_getspecific pthread_join pthread_key_create pthread_key_delete
pthread_mutex_destroy pthread_mutex_init pthread_mutex_lock pthread_mutex_trylock
pthread_mutex_unlock pthread_once pthread_self pthread_setspecific puts putchar qsort raise read
realloc sched_getaffinity sched_getcpu sched_setaffinity sched_yield snprintf sprintf sscanf stderr
stdout strchr strcmp strcpy strdup strerror strlen strncmp strncpy strnlen strrchr strstr strtod
strtof strtol strtoll strtoul strtoull syscall sysconf time usleep vfprintf vsnprintf write
""".split())

# The TVM runtime's C ABI, by the library that exports it (checked against the aarch64 wheels).
TVM_LIBRARIES = {"libtvm_ffi.so": ("TVMFFI",), "libtvm_runtime.so": ("TVMBackend", "TVMAPI")}
TVM_PREFIXES = tuple(p for prefixes in TVM_LIBRARIES.values() for p in prefixes)

BY_LIBRARY = {"libc.so": LIBC, "libm.so": LIBM, "libdl.so": LIBDL}
