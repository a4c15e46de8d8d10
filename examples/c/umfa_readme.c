/* UMFA's README C/Objective-C example, completed into a program. Only its include line changed:
 * the README declared the mfa_* functions by hand; here they come from <mfa.h> (ufa).
 * Build: cc -std=c11 umfa_readme.c $(pkg-config --cflags --libs ufa) -lm */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <mfa.h>

int main(void) {
    const int seq_len = 64, head_dim = 32;
    size_t buffer_size = (size_t)seq_len * head_dim * sizeof(float);

    // Create context
    mfa_context_t context;
    if (mfa_create_context(&context) != MFA_SUCCESS) return 1;

    // Create buffers
    mfa_buffer_t q_buffer, k_buffer, v_buffer, o_buffer;
    mfa_create_buffer(context, buffer_size, &q_buffer);
    mfa_create_buffer(context, buffer_size, &k_buffer);
    mfa_create_buffer(context, buffer_size, &v_buffer);
    mfa_create_buffer(context, buffer_size, &o_buffer);
    float* q = mfa_buffer_contents(q_buffer);
    float* k = mfa_buffer_contents(k_buffer);
    float* v = mfa_buffer_contents(v_buffer);
    for (int i = 0; i < seq_len * head_dim; i++) {
        q[i] = sinf(0.37f * (float)i);
        k[i] = cosf(0.11f * (float)i);
        v[i] = sinf(0.05f * (float)i + 1.0f);
    }

    // Run attention
    mfa_error_t status = mfa_attention_forward(context,
                         q_buffer, k_buffer, v_buffer, o_buffer,
                         1, seq_len, seq_len, 1, head_dim,
                         1.0f / sqrtf(head_dim), false,
                         2, 2, 2, // FP32 precision
                         false, false, false, false);
    if (status != MFA_SUCCESS) {
        fprintf(stderr, "mfa_attention_forward: %s\n", mfa_error_string(status));
        return 1;
    }

    /* Check against attention computed directly in double precision. */
    const float* o = mfa_buffer_contents(o_buffer);
    double worst = 0, scale = 1.0 / sqrt(head_dim), s[64];
    for (int i = 0; i < seq_len; i++) {
        double m = -INFINITY, l = 0;
        for (int j = 0; j < seq_len; j++) {
            s[j] = 0;
            for (int e = 0; e < head_dim; e++) s[j] += (double)q[i * head_dim + e] * k[j * head_dim + e];
            s[j] *= scale;
            m = fmax(m, s[j]);
        }
        for (int j = 0; j < seq_len; j++) l += exp(s[j] - m);
        for (int e = 0; e < head_dim; e++) {
            double ref = 0;
            for (int j = 0; j < seq_len; j++) ref += exp(s[j] - m) / l * v[j * head_dim + e];
            worst = fmax(worst, fabs(ref - o[i * head_dim + e]));
        }
    }
    printf("umfa_readme (C): largest difference from the float64 reference %.2e\n", worst);

    mfa_destroy_buffer(q_buffer);
    mfa_destroy_buffer(k_buffer);
    mfa_destroy_buffer(v_buffer);
    mfa_destroy_buffer(o_buffer);
    mfa_destroy_context(context);
    return worst < 1e-5 ? 0 : 1;
}
