/* Runs a fuzz target's LLVMFuzzerTestOneInput once on every file named on the command line (or
 * found in a directory named there), without libFuzzer: the regression test of scripts/fuzz
 * replay, built with plain gcc and AddressSanitizer against the release library. A finding
 * aborts, as under the fuzzer; a clean run prints how many inputs it ran. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

static long g_runs;

static void run_file(const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    /* malloc of exactly n bytes, so that ASan sees a harness reading past the input. */
    uint8_t* buf = (uint8_t*)malloc(n > 0 ? (size_t)n : 1);
    if (!buf || (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n)) {
        perror(path);
        exit(2);
    }
    fclose(f);
    if (getenv("FUZZ_REPLAY_VERBOSE")) fprintf(stderr, "replay %s\n", path);
    LLVMFuzzerTestOneInput(buf, (size_t)n);
    free(buf);
    g_runs++;
}

static int by_name(const void* a, const void* b) { return strcmp(*(char* const*)a, *(char* const*)b); }

static void run_path(const char* path) {
    struct stat st;
    if (stat(path, &st) != 0) return; /* an absent corpus directory is an empty one */
    if (!S_ISDIR(st.st_mode)) {
        run_file(path);
        return;
    }
    DIR* d = opendir(path);
    if (!d) {
        perror(path);
        exit(2);
    }
    char** names = NULL;
    size_t n = 0;
    for (struct dirent* e; (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.') continue;
        names = (char**)realloc(names, (n + 1) * sizeof *names);
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        names[n] = (char*)malloc(len);
        snprintf(names[n], len, "%s/%s", path, e->d_name);
        n++;
    }
    closedir(d);
    /* A fixed order, so that a failure names the same input on every machine. */
    if (n > 0) qsort(names, n, sizeof *names, by_name);
    for (size_t i = 0; i < n; i++) {
        run_path(names[i]);
        free(names[i]);
    }
    free(names);
}

int main(int argc, char** argv) {
    for (int i = 1; i < argc; i++) run_path(argv[i]);
    printf("%ld inputs replayed\n", g_runs);
    return 0;
}
