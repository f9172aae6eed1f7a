// Runs the real kernels/*.cu on the CPU (cuda_emu.h) against straightforward double-precision
// references. Built and run by tests/kernels_emulated.rs. Prints one line per check and
// exits non-zero if any fails.
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_bf16.h"

#include "embedding.cu"
#include "kv_write.cu"
#include "paged_attention.cu"
#include "prefill_attention.cu"
#include "rmsnorm.cu"
#include "rope.cu"
#include "sampling.cu"
#include "silu_mul.cu"

extern "C" void emu_trampoline() {
    emu::g_body();
    emu::g_cur->state = emu::DONE;
    emu_switch(&emu::g_cur->sp, emu::g_sched_sp);
    std::abort();
}

static int g_failures = 0;
static std::mt19937_64 g_rng(12345);

static float bfr(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// 16-byte aligned host buffers (the kernels use 16-byte vector loads).
template <class T>
struct Buf {
    T* p = nullptr;
    size_t n = 0;
    explicit Buf(size_t count) : n(count) {
        size_t bytes = ((count * sizeof(T) + 15) / 16 + 1) * 16;
        p = static_cast<T*>(std::aligned_alloc(16, bytes));
        std::memset(static_cast<void*>(p), 0, bytes);
    }
    ~Buf() { std::free(p); }
    Buf(const Buf&) = delete;
    T& operator[](size_t i) { return p[i]; }
};

static void fill_bf16(Buf<bf16>& b, double stddev, std::vector<double>* mirror = nullptr) {
    std::normal_distribution<double> d(0.0, stddev);
    if (mirror) mirror->resize(b.n);
    for (size_t i = 0; i < b.n; ++i) {
        b[i] = __float2bfloat16_rn((float)d(g_rng));
        if (mirror) (*mirror)[i] = __bfloat162float(b[i]);
    }
}

static void report(const std::string& name, double max_err, double tol) {
    bool ok = max_err <= tol;
    if (!ok) ++g_failures;
    std::printf("%s %-60s max_err=%.3e tol=%.1e\n", ok ? "PASS" : "FAIL", name.c_str(), max_err, tol);
}

// ---------------------------------------------------------------------------------------
static void test_embedding(unsigned hidden, unsigned row_offset) {
    const unsigned rows_table = 50, n = 9;
    Buf<bf16> table(rows_table * hidden), out(n * hidden);
    fill_bf16(table, 1.0);
    Buf<u32> ids(n);
    for (unsigned i = 0; i < n; ++i) ids[i] = (unsigned)(g_rng() % (row_offset + rows_table + 20));  // some outside
    // The slice's edges: its first and last row, and the ids just outside it.
    ids[0] = row_offset;
    ids[1] = row_offset + rows_table - 1;
    ids[2] = row_offset + rows_table;
    if (row_offset > 0) ids[3] = row_offset - 1;
    emu::launch(dim3{n, 1, 1}, dim3{256, 1, 1},
                [&] { embedding_gather_bf16(table.p, ids.p, out.p, rows_table, row_offset, hidden); });
    double err = 0;
    for (unsigned t = 0; t < n; ++t) {
        unsigned local = ids[t] - row_offset;
        for (unsigned j = 0; j < hidden; ++j) {
            float want = (ids[t] >= row_offset && local < rows_table) ? __bfloat162float(table[local * hidden + j]) : 0.0f;
            err = std::max(err, (double)std::fabs(__bfloat162float(out[t * hidden + j]) - want));
        }
    }
    report("embedding hidden=" + std::to_string(hidden) + " row_offset=" + std::to_string(row_offset), err, 0.0);
}

// ---------------------------------------------------------------------------------------
static void test_rmsnorm(unsigned hidden, unsigned threads, bool fused) {
    const unsigned rows = 3;
    const float eps = 1e-5f;
    Buf<bf16> x(rows * hidden), res(rows * hidden), w(hidden), out(rows * hidden);
    std::vector<double> xd, rd, wd;
    fill_bf16(x, 1.0, &xd);
    fill_bf16(res, 1.0, &rd);
    fill_bf16(w, 0.1, &wd);
    for (unsigned i = 0; i < hidden; ++i) {
        w[i] = __float2bfloat16_rn(1.0f + (float)wd[i]);
        wd[i] = __bfloat162float(w[i]);
    }
    if (fused) {
        emu::launch(dim3{rows, 1, 1}, dim3{threads, 1, 1},
                    [&] { fused_add_rmsnorm_bf16(x.p, res.p, w.p, out.p, hidden, eps); });
    } else {
        emu::launch(dim3{rows, 1, 1}, dim3{threads, 1, 1}, [&] { rmsnorm_bf16(x.p, w.p, out.p, hidden, eps); });
    }
    double err = 0, res_err = 0;
    for (unsigned r = 0; r < rows; ++r) {
        std::vector<double> v(hidden);
        for (unsigned j = 0; j < hidden; ++j) {
            v[j] = fused ? (double)bfr((float)(rd[r * hidden + j] + xd[r * hidden + j])) : xd[r * hidden + j];
            if (fused) res_err = std::max(res_err, std::fabs(__bfloat162float(res[r * hidden + j]) - v[j]));
        }
        double ss = 0;
        for (double e : v) ss += e * e;
        double inv = 1.0 / std::sqrt(ss / hidden + eps);
        for (unsigned j = 0; j < hidden; ++j) {
            double want = v[j] * inv * wd[j];
            err = std::max(err, std::fabs(__bfloat162float(out[r * hidden + j]) - want) / (1.0 + std::fabs(want)));
        }
    }
    std::string name = std::string(fused ? "fused_add_rmsnorm" : "rmsnorm") + " hidden=" + std::to_string(hidden) +
                       " threads=" + std::to_string(threads);
    report(name, err, 8e-3);
    if (fused) report(name + " residual", res_err, 0.0);
}

// ---------------------------------------------------------------------------------------
static void test_rope() {
    const unsigned n_heads = 4, n_kv = 2, hd = 32, half = hd / 2, n = 7, max_pos = 5000;
    const unsigned width = (n_heads + 2 * n_kv) * hd;
    Buf<bf16> qkv(n * width);
    std::vector<double> orig;
    fill_bf16(qkv, 1.0, &orig);
    Buf<float> table(max_pos * hd);
    for (unsigned p = 0; p < max_pos; ++p)
        for (unsigned i = 0; i < half; ++i) {
            double a = p * std::pow(10000.0, -2.0 * i / hd);
            table[p * hd + i] = (float)std::cos(a);
            table[p * hd + half + i] = (float)std::sin(a);
        }
    Buf<u32> pos(n);
    for (unsigned t = 0; t < n; ++t) pos[t] = (unsigned)(g_rng() % max_pos);
    emu::launch(dim3{n, 1, 1}, dim3{128, 1, 1},
                [&] { rope_inplace_bf16(qkv.p, qkv.p + n_heads * hd, pos.p, table.p, hd, n_heads, n_kv, hd, width, width); });
    double err = 0;
    for (unsigned t = 0; t < n; ++t)
        for (unsigned h = 0; h < n_heads + 2 * n_kv; ++h)
            for (unsigned i = 0; i < hd; ++i) {
                size_t base = (size_t)t * width + h * hd;
                double want = orig[base + i];
                if (h < n_heads + n_kv) {
                    unsigned k = i % half;
                    double a = pos[t] * std::pow(10000.0, -2.0 * k / hd);
                    double x1 = orig[base + k], x2 = orig[base + k + half];
                    want = i < half ? x1 * std::cos(a) - x2 * std::sin(a) : x2 * std::cos(a) + x1 * std::sin(a);
                }
                err = std::max(err, std::fabs(__bfloat162float(qkv[base + i]) - want));
            }
    report("rope heads=4 kv=2 hd=32 (v untouched)", err, 2e-2);
}

// ---------------------------------------------------------------------------------------
static void test_silu(unsigned inter) {
    const unsigned rows = 3;
    Buf<bf16> gu(rows * 2 * inter), out(rows * inter);
    std::vector<double> g;
    fill_bf16(gu, 1.5, &g);
    unsigned col_blocks = std::max(1u, ((inter + 7) / 8 + 255) / 256);
    emu::launch(dim3{rows, col_blocks, 1}, dim3{256, 1, 1}, [&] { silu_mul_bf16(gu.p, out.p, inter); });
    double err = 0;
    for (unsigned r = 0; r < rows; ++r)
        for (unsigned j = 0; j < inter; ++j) {
            double a = g[r * 2 * inter + j], b = g[r * 2 * inter + inter + j];
            double want = a / (1.0 + std::exp(-a)) * b;
            err = std::max(err, std::fabs(__bfloat162float(out[r * inter + j]) - want) / (1.0 + std::fabs(want)));
        }
    report("silu_mul inter=" + std::to_string(inter), err, 8e-3);
}

// ---------------------------------------------------------------------------------------
// A paged cache filled through kv_cache_write_bf16, and a reference attention over it.
struct Seq {
    unsigned prefix, query;
};

struct PagedCase {
    unsigned n_heads, n_kv, hd, block_size;
    std::vector<Seq> seqs;
    unsigned width() const { return (n_heads + 2 * n_kv) * hd; }
};

struct PagedState {
    std::vector<std::vector<unsigned>> tables;  // per seq
    std::vector<double> k, v;                   // [seq][pos][kv][hd] flattened per seq
    unsigned num_blocks = 0;
};

static void test_attention(const PagedCase& c, bool use_decode_kernel, unsigned partition_size) {
    const unsigned hd = c.hd, width = c.width(), n_seq = (unsigned)c.seqs.size();
    const unsigned group = c.n_heads / c.n_kv;
    // Block allocation, shuffled.
    std::vector<std::vector<unsigned>> tables(n_seq);
    unsigned total_blocks = 0;
    for (auto& s : c.seqs) total_blocks += (s.prefix + s.query + c.block_size - 1) / c.block_size;
    std::vector<unsigned> ids(total_blocks + 2);
    std::iota(ids.begin(), ids.end(), 0u);
    std::shuffle(ids.begin(), ids.end(), g_rng);
    unsigned next = 0;
    for (unsigned s = 0; s < n_seq; ++s) {
        unsigned nb = (c.seqs[s].prefix + c.seqs[s].query + c.block_size - 1) / c.block_size;
        for (unsigned b = 0; b < nb; ++b) tables[s].push_back(ids[next++]);
    }
    const unsigned num_blocks = total_blocks + 2;
    const size_t cache_elems = (size_t)num_blocks * c.block_size * c.n_kv * hd;
    Buf<bf16> kc(cache_elems), vc(cache_elems);
    // Every position of every sequence gets K/V through the write kernel (one launch).
    unsigned all_tokens = 0;
    for (auto& s : c.seqs) all_tokens += s.prefix + s.query;
    Buf<bf16> kvsrc(all_tokens * width);
    std::vector<double> kvd;
    fill_bf16(kvsrc, 1.0, &kvd);
    Buf<u32> slots(all_tokens + 1);
    std::vector<std::pair<unsigned, unsigned>> tok_of;  // (seq, pos) per write row
    for (unsigned s = 0, t = 0; s < n_seq; ++s)
        for (unsigned p = 0; p < c.seqs[s].prefix + c.seqs[s].query; ++p, ++t) {
            slots[t] = tables[s][p / c.block_size] * c.block_size + p % c.block_size;
            tok_of.push_back({s, p});
        }
    slots[all_tokens] = 0xffffffffu;  // a padding row must be skipped
    Buf<bf16> kvsrc_pad((all_tokens + 1) * width);
    std::memcpy(kvsrc_pad.p, kvsrc.p, sizeof(bf16) * all_tokens * width);
    for (unsigned j = 0; j < width; ++j) kvsrc_pad[all_tokens * width + j] = __float2bfloat16_rn(1000.0f);
    emu::launch(dim3{all_tokens + 1, 1, 1}, dim3{128, 1, 1}, [&] {
        kv_cache_write_bf16(kvsrc_pad.p + c.n_heads * hd, kvsrc_pad.p + (c.n_heads + c.n_kv) * hd, kc.p, vc.p, slots.p,
                            c.n_kv, hd, width, width);
    });
    auto kref = [&](unsigned s, unsigned p, unsigned kvh, unsigned d, bool is_v) {
        unsigned t = 0;
        for (unsigned i = 0; i < s; ++i) t += c.seqs[i].prefix + c.seqs[i].query;
        t += p;
        return kvd[(size_t)t * width + (c.n_heads + (is_v ? c.n_kv : 0) + kvh) * hd + d];
    };
    // The cache must hold exactly what was written; the padding row must not land anywhere.
    double write_err = 0;
    for (unsigned s = 0; s < n_seq; ++s)
        for (unsigned p = 0; p < c.seqs[s].prefix + c.seqs[s].query; ++p) {
            size_t slot = tables[s][p / c.block_size] * c.block_size + p % c.block_size;
            for (unsigned kvh = 0; kvh < c.n_kv; ++kvh)
                for (unsigned d = 0; d < hd; ++d) {
                    size_t at = (slot * c.n_kv + kvh) * hd + d;
                    write_err = std::max(write_err, std::fabs(__bfloat162float(kc[at]) - kref(s, p, kvh, d, false)));
                    write_err = std::max(write_err, std::fabs(__bfloat162float(vc[at]) - kref(s, p, kvh, d, true)));
                }
        }
    char label[200];
    std::snprintf(label, sizeof label, "heads=%u kv=%u hd=%u bs=%u seqs=%u", c.n_heads, c.n_kv, hd, c.block_size, n_seq);
    report(std::string("kv_cache_write ") + label, write_err, 0.0);

    // This step's queries.
    unsigned n_q = 0;
    for (auto& s : c.seqs) n_q += s.query;
    Buf<bf16> q(n_q * width);
    std::vector<double> qd;
    fill_bf16(q, 1.0, &qd);
    Buf<bf16> out(n_q * c.n_heads * hd);
    const float scale = 1.0f / std::sqrt((float)hd);
    unsigned max_blocks = 0;
    for (auto& t : tables) max_blocks = std::max(max_blocks, (unsigned)t.size());
    Buf<u32> bt(n_seq * max_blocks), qstart(n_seq), qlen(n_seq), ctx(n_seq);
    for (unsigned s = 0, row = 0; s < n_seq; ++s) {
        for (unsigned b = 0; b < tables[s].size(); ++b) bt[s * max_blocks + b] = tables[s][b];
        qstart[s] = row;
        qlen[s] = c.seqs[s].query;
        ctx[s] = c.seqs[s].prefix + c.seqs[s].query;
        row += c.seqs[s].query;
    }
    std::string which;
    if (use_decode_kernel) {
        unsigned max_ctx = 0;
        for (unsigned s = 0; s < n_seq; ++s) max_ctx = std::max(max_ctx, (unsigned)ctx[s]);
        unsigned parts = (max_ctx + partition_size - 1) / partition_size;
        Buf<float> acc((size_t)n_seq * c.n_heads * parts * hd), mx((size_t)n_seq * c.n_heads * parts),
            sm((size_t)n_seq * c.n_heads * parts);
        emu::launch(dim3{c.n_kv, n_seq, parts}, dim3{128, 1, 1}, [&] {
            switch (hd) {
                case 32: paged_attention_decode_hd32_bf16(q.p, width, kc.p, vc.p, bt.p, max_blocks, ctx.p, qstart.p, acc.p, mx.p, sm.p, c.n_heads, c.n_kv, c.block_size, partition_size, parts, scale); break;
                case 64: paged_attention_decode_hd64_bf16(q.p, width, kc.p, vc.p, bt.p, max_blocks, ctx.p, qstart.p, acc.p, mx.p, sm.p, c.n_heads, c.n_kv, c.block_size, partition_size, parts, scale); break;
                default: paged_attention_decode_hd128_bf16(q.p, width, kc.p, vc.p, bt.p, max_blocks, ctx.p, qstart.p, acc.p, mx.p, sm.p, c.n_heads, c.n_kv, c.block_size, partition_size, parts, scale); break;
            }
        });
        emu::launch(dim3{c.n_heads, n_seq, 1}, dim3{128, 1, 1}, [&] {
            paged_attention_reduce_bf16(acc.p, mx.p, sm.p, ctx.p, qstart.p, out.p, c.n_heads * hd, c.n_heads, hd, partition_size, parts);
        });
        which = "decode P=" + std::to_string(partition_size) + " parts=" + std::to_string(parts);
    } else {
        std::vector<unsigned> ts, tq;
        for (unsigned s = 0; s < n_seq; ++s)
            for (int t = (int)((c.seqs[s].query + 31) / 32) - 1; t >= 0; --t) {
                ts.push_back(s);
                tq.push_back((unsigned)t * 32);
            }
        Buf<u32> tile_seq(ts.size()), tile_q(ts.size());
        for (size_t i = 0; i < ts.size(); ++i) {
            tile_seq[i] = ts[i];
            tile_q[i] = tq[i];
        }
        emu::launch(dim3{(unsigned)ts.size(), c.n_heads, 1}, dim3{128, 1, 1}, [&] {
            switch (hd) {
                case 32: prefill_attention_hd32_bf16(q.p, width, kc.p, vc.p, bt.p, max_blocks, qstart.p, qlen.p, ctx.p, tile_seq.p, tile_q.p, out.p, c.n_heads * hd, c.n_heads, c.n_kv, c.block_size, scale); break;
                case 64: prefill_attention_hd64_bf16(q.p, width, kc.p, vc.p, bt.p, max_blocks, qstart.p, qlen.p, ctx.p, tile_seq.p, tile_q.p, out.p, c.n_heads * hd, c.n_heads, c.n_kv, c.block_size, scale); break;
                default: prefill_attention_hd128_bf16(q.p, width, kc.p, vc.p, bt.p, max_blocks, qstart.p, qlen.p, ctx.p, tile_seq.p, tile_q.p, out.p, c.n_heads * hd, c.n_heads, c.n_kv, c.block_size, scale); break;
            }
        });
        which = "prefill tiles=" + std::to_string(ts.size());
    }
    // Reference: exact causal softmax attention in double.
    double err = 0;
    for (unsigned s = 0; s < n_seq; ++s)
        for (unsigned i = 0; i < c.seqs[s].query; ++i) {
            unsigned row = qstart[s] + i, pos = c.seqs[s].prefix + i;
            for (unsigned h = 0; h < c.n_heads; ++h) {
                unsigned kvh = h / group;
                std::vector<double> sc(pos + 1);
                double m = -1e300;
                for (unsigned p = 0; p <= pos; ++p) {
                    double d = 0;
                    for (unsigned j = 0; j < hd; ++j) d += qd[(size_t)row * width + h * hd + j] * kref(s, p, kvh, j, false);
                    sc[p] = d * scale;
                    m = std::max(m, sc[p]);
                }
                double z = 0;
                for (auto& e : sc) z += (e = std::exp(e - m));
                for (unsigned j = 0; j < hd; ++j) {
                    double o = 0;
                    for (unsigned p = 0; p <= pos; ++p) o += sc[p] * kref(s, p, kvh, j, true);
                    o /= z;
                    err = std::max(err, std::fabs(__bfloat162float(out[(size_t)row * c.n_heads * hd + h * hd + j]) - o));
                }
            }
        }
    report(std::string("attention ") + which + " " + label, err, 2e-2);
}

// ---------------------------------------------------------------------------------------
// Host statement of sampling.cu's rules (same as allam-backend-cuda's reference_sample).
struct Pick {
    unsigned token;
    double logprob, margin;
    std::vector<std::pair<unsigned, double>> top;
};

static Pick ref_sample(const std::vector<float>& row, float temp, unsigned top_k, float top_p, float u, unsigned n_top) {
    std::vector<double> l(row.size());
    for (size_t i = 0; i < row.size(); ++i) l[i] = std::isnan(row[i]) ? -INFINITY : row[i];
    size_t am = 0;
    for (size_t i = 0; i < l.size(); ++i)
        if (l[i] > l[am]) am = i;
    double mx = l[am], z = 0;
    for (double v : l) z += std::exp(v - mx);
    double lse = mx + std::log(z);
    Pick pk{(unsigned)am, 0, INFINITY, {}};
    if (temp > 0 && top_k != 1) {
        std::vector<double> desc = l;
        std::sort(desc.begin(), desc.end(), std::greater<double>());
        double floor = (top_k == 0 || top_k >= l.size()) ? -INFINITY : desc[top_k - 1];
        auto w = [&](double v) { return std::exp((v - mx) / temp); };
        double total = 0;
        for (double v : l)
            if (v >= floor) total += w(v);
        double th = floor;
        if (top_p < 1) {
            double target = top_p * total, cum = 0;
            for (size_t i = 0; i < desc.size() && desc[i] >= floor;) {
                double v = desc[i];
                while (i < desc.size() && desc[i] == v) cum += w(desc[i++]);
                if (cum >= target) {
                    th = v;
                    break;
                }
            }
        }
        double mass = 0;
        for (double v : l)
            if (v >= th) mass += w(v);
        double target = u * mass, run = 0;
        for (size_t i = 0; i < l.size(); ++i)
            if (l[i] >= th) {
                double before = run;
                run += w(l[i]);
                if (run > target) {
                    pk.token = (unsigned)i;
                    pk.margin = std::min(target - before, run - target) / mass;
                    break;
                }
            }
    }
    pk.logprob = l[pk.token] - lse;
    std::vector<unsigned> order(l.size());
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(), [&](unsigned a, unsigned b) { return l[a] > l[b]; });
    for (unsigned i = 0; i < n_top && i < order.size(); ++i) pk.top.push_back({order[i], l[order[i]] - lse});
    return pk;
}

static void test_sampling() {
    const unsigned vocab = 3000, n_top = 5;
    struct Mode {
        float temp;
        unsigned k;
        float p;
    };
    std::vector<Mode> modes = {{0, 0, 1}, {0.7f, 50, 1}, {1, 0, 0.9f}, {1.3f, 200, 0.8f}, {1, 0, 1}, {1, 1, 1}, {0.5f, 3000, 0.5f}};
    const unsigned rows = (unsigned)modes.size() * 3;
    Buf<float> logits(rows * vocab), temp(rows), topp(rows), uni(rows), out_lp(rows), top_lp(rows * 20);
    Buf<u32> topk(rows), out_tok(rows), top_ids(rows * 20);
    std::normal_distribution<double> d(0, 4);
    std::uniform_real_distribution<float> U(0, 1);
    for (unsigned r = 0; r < rows; ++r) {
        for (unsigned i = 0; i < vocab; ++i) logits[r * vocab + i] = (float)d(g_rng);
        // Ties and NaN/-inf must be handled: duplicate the row's max, poison a few entries.
        unsigned am = 0;
        for (unsigned i = 1; i < vocab; ++i)
            if (logits[r * vocab + i] > logits[r * vocab + am]) am = i;
        logits[r * vocab + (am + 7) % vocab] = logits[r * vocab + am];
        logits[r * vocab + 11] = NAN;
        logits[r * vocab + 12] = -INFINITY;
        Mode m = modes[r % modes.size()];
        temp[r] = m.temp;
        topk[r] = m.k;
        topp[r] = m.p;
        uni[r] = U(g_rng);
    }
    emu::launch(dim3{rows, 1, 1}, dim3{512, 1, 1}, [&] {
        sample_rows_f32(logits.p, vocab, vocab, temp.p, topk.p, topp.p, uni.p, n_top, out_tok.p, out_lp.p, top_ids.p, top_lp.p);
    });
    double lp_err = 0;
    int bad = 0, boundary = 0;
    for (unsigned r = 0; r < rows; ++r) {
        std::vector<float> row(logits.p + r * vocab, logits.p + (r + 1) * vocab);
        Pick want = ref_sample(row, temp[r], topk[r], topp[r], uni[r], n_top);
        bool top_ok = true;
        for (unsigned j = 0; j < n_top; ++j) {
            top_ok &= top_ids[r * 20 + j] == want.top[j].first;
            lp_err = std::max(lp_err, std::fabs(top_lp[r * 20 + j] - want.top[j].second));
        }
        if (out_tok[r] != want.token || !top_ok) {
            if (want.margin < 1e-4 && top_ok) {
                ++boundary;
            } else {
                ++bad;
                std::printf("  row %u (T=%g k=%u p=%g u=%g): token %u vs %u, top ok %d\n", r, temp[r], topk[r], topp[r], uni[r],
                            out_tok[r], want.token, (int)top_ok);
            }
            continue;
        }
        lp_err = std::max(lp_err, std::fabs(out_lp[r] - want.logprob));
    }
    report("sample_rows tokens (mismatches, " + std::to_string(boundary) + " at a CDF boundary)", bad, 0);
    report("sample_rows logprobs (chosen + top-5)", lp_err, 1e-3);
}

int main() {
    for (unsigned hidden : {24u, 64u}) test_embedding(hidden, 0);
    // Vocabulary-parallel slices (ids below and past the slice give zero rows), on the
    // 16-byte vector path and the scalar one.
    test_embedding(64, 30);
    test_embedding(24, 30);
    for (bool fused : {false, true}) {
        test_rmsnorm(100, 32, fused);
        test_rmsnorm(256, 64, fused);
        test_rmsnorm(4096, 1024, fused);
    }
    test_rope();
    for (unsigned inter : {688u, 13u, 2056u}) test_silu(inter);

    const std::vector<PagedCase> decode_cases = {
        {8, 2, 32, 16, {{0, 1}, {16, 1}, {299, 1}, {700, 1}}},
        {4, 4, 128, 16, {{0, 1}, {130, 1}, {515, 1}}},
        {8, 8, 64, 32, {{40, 1}, {1, 1}}},
        {16, 2, 32, 16, {{100, 1}}},
        {16, 2, 128, 5, {{63, 1}, {64, 1}, {0, 1}, {1000, 1}}},
    };
    for (const auto& c : decode_cases) {
        test_attention(c, true, 64);
        test_attention(c, true, 512);
    }
    const std::vector<PagedCase> prefill_cases = {
        {8, 2, 32, 16, {{0, 37}, {50, 40}, {3, 1}, {0, 1}}},
        {4, 4, 128, 16, {{0, 33}, {20, 70}}},
        {8, 8, 64, 32, {{64, 33}}},
        {16, 2, 128, 5, {{500, 64}, {7, 3}}},
    };
    for (const auto& c : prefill_cases) test_attention(c, false, 0);
    test_sampling();
    std::printf("%d failure(s)\n", g_failures);
    return g_failures == 0 ? 0 : 1;
}
