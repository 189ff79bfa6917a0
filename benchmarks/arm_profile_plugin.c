/* A qemu TCG plugin: how many times each translated block ran, for benchmarks/arm_profile.py.
 *
 *   qemu-aarch64 -plugin ./libbitfx_tbcount.so,out=tbs.txt ./program ...
 *
 * At exit it writes one line per translated block that ran: `vaddr n_insns executions` (hex,
 * decimal, decimal). Dynamic instructions = sum of n_insns * executions; arm_profile.py maps the
 * addresses to symbols. Counting is an inline add per block (no callback), so the guest runs at
 * near-TCG speed; the add is not atomic, so run one guest thread (TVM_NUM_THREADS=1). A block
 * that leaves early (a fault) is counted whole: exact for code that does not fault.
 * Built against the installed qemu's qemu-plugin.h (its QEMU_PLUGIN_VERSION must be one qemu accepts).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

typedef struct Block {
  uint64_t vaddr;
  uint64_t n_insns;
  uint64_t executions;
  struct Block* next;
} Block;

static Block* blocks;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char out_path[4096] = "tbcount.txt";

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb* tb) {
  Block* b = calloc(1, sizeof(Block));
  if (b == NULL) abort();
  b->vaddr = qemu_plugin_tb_vaddr(tb);
  b->n_insns = qemu_plugin_tb_n_insns(tb);
  pthread_mutex_lock(&lock);
  b->next = blocks;
  blocks = b;
  pthread_mutex_unlock(&lock);
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->executions, 1);
}

static void write_counts(qemu_plugin_id_t id, void* data) {
  FILE* f = fopen(out_path, "w");
  if (f == NULL) {
    perror(out_path);
    return;
  }
  pthread_mutex_lock(&lock);
  for (Block* b = blocks; b != NULL; b = b->next) {
    if (b->executions) fprintf(f, "%" PRIx64 " %" PRIu64 " %" PRIu64 "\n", b->vaddr, b->n_insns, b->executions);
  }
  pthread_mutex_unlock(&lock);
  fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t* info, int argc,
                                           char** argv) {
  for (int i = 0; i < argc; ++i) {
    if (strncmp(argv[i], "out=", 4) == 0) {
      snprintf(out_path, sizeof(out_path), "%s", argv[i] + 4);
    } else {
      fprintf(stderr, "bitfx tbcount plugin: unknown argument '%s' (expected out=PATH)\n", argv[i]);
      return -1;
    }
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  qemu_plugin_register_atexit_cb(id, write_counts, NULL);
  return 0;
}
