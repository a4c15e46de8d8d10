/* The C API this package binds; found through pkg-config (ufa.pc). */
#include <ufa.h>
