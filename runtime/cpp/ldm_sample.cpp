// DDIM sampling with guidance over the TorchScript exports, then the VAE decoder. The guidance is the Python
// runtime's (python/core/diffusion.py guide_outputs): adaptive projected guidance on the predicted x_0 with the
// update's norm capped at --apg-norm, or classifier-free guidance with --apg-norm 0; then classifier guidance on
// that x_0 (python/core/diffusion.py guide_class) through the exported class_grad.ts, --class-iters descent steps
// per sampler step, --class-scale 0 to leave it out.
//
//   ldm_sample EXPORT_DIR OUT_DIR --labels "red sphere,yellow cube" [-n 8] [--steps 20] [--guidance 5]
//              [--apg-norm 5] [--class-scale 2] [--class-iters 1] [--spacing trailing] [--eta 0] [--seed 0]
//   ldm_sample EXPORT_DIR OUT_DIR --cond COND.f32 --noise NOISE.f32 [--steps 20] [--guidance 5] [--apg-norm 5]
//              [--class-scale 2] [--class-iters 1] [--spacing trailing] [--eta E --step-noise STEPS.f32]
//   --repeat R: sample R times from the same noise and print {"seconds": [...]} (noise -> images, models
//   already loaded), for bench/latency.py.
//
// The schedule (alpha_bar for t = 0..T-1) and the label list come from files the Python export writes
// (schedule.txt, labels.txt): the maths that defines them lives once, in python/core/diffusion.py; this file only
// runs the DDIM update x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps on python.core.diffusion.DDIM's timesteps:
// --spacing trailing (the default: T-1, T-1-T/n, ... rounded, each step to the next, the last to x_0) or leading
// (0, T//n, ..., diffusers' default, which starts at t = T - T//n). --eta (0-1, default 0: deterministic) adds DDIM's
// stochastic term as python.core.diffusion.DDIM does: sigma = eta sqrt((1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)),
// x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z, z drawn per step from --seed's own stream, or
// read from --step-noise (steps x N x C x H x W float32: python.core.noise.step_noise, for parity tests).
// A layout denoiser's export (layout.txt: the width of its condition rows, the label set then each class's place,
// python/core/layout.py) is sampled from --cond files whose rows carry the places: `python -m runtime.generate ...
// --save-cond DIR` draws them from the export's placement prior and writes DIR/cond.f32 and DIR/noise.f32.
// Writes 0.ppm ... N-1.ppm and images.f32 (N x 3 x 64 x 64, float32, [-1, 1]) for parity tests.
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace {

[[noreturn]] void fail(const std::string& msg) {
  std::cerr << "error: " << msg << "\n";
  std::exit(2);
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail(path + ": not found (run `python export/to_onnx.py --format both`)");
  std::vector<std::string> lines;
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) lines.push_back(line);
  return lines;
}

torch::Tensor read_f32(const std::string& path, std::vector<int64_t> shape_tail) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) fail(path + ": not found");
  int64_t bytes = f.tellg(), per = 4;
  for (auto d : shape_tail) per *= d;
  if (bytes % per) fail(path + ": size is not a multiple of one item");
  std::vector<int64_t> shape{bytes / per};
  shape.insert(shape.end(), shape_tail.begin(), shape_tail.end());
  auto t = torch::empty(shape, torch::kFloat32);
  f.seekg(0);
  f.read(reinterpret_cast<char*>(t.data_ptr<float>()), bytes);
  return t;
}

void write_ppm(const std::string& path, const torch::Tensor& img) {  // img: 3 x H x W in [-1, 1]
  auto u8 = ((img.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch::kUInt8).permute({1, 2, 0}).contiguous();
  std::ofstream f(path, std::ios::binary);
  f << "P6\n" << u8.size(1) << " " << u8.size(0) << "\n255\n";
  f.write(reinterpret_cast<const char*>(u8.data_ptr<uint8_t>()), u8.numel());
}

// An option's value as a number, the whole of it ("2.5" is not a step count, "8x" not a count), or a one-line error.
template <typename T, typename Parse>
T number(const std::string& option, const std::string& v, Parse parse) {
  size_t used = 0;
  T x{};
  try {
    x = parse(v, &used);
  } catch (const std::logic_error&) {  // not a number, or out of range
    used = std::string::npos;
  }
  if (used != v.size() || v.empty() || (v[0] == '-' && std::is_unsigned<T>::value))
    fail(option + " must be a number, got '" + v + "'");
  return x;
}
int whole(const std::string& o, const std::string& v) {
  return number<int>(o, v, [](const std::string& s, size_t* p) { return std::stoi(s, p); });
}
double real(const std::string& o, const std::string& v) {
  return number<double>(o, v, [](const std::string& s, size_t* p) { return std::stod(s, p); });
}
uint64_t unsigned64(const std::string& o, const std::string& v) {
  return number<uint64_t>(o, v, [](const std::string& s, size_t* p) { return std::stoull(s, p); });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3)
    fail("usage: ldm_sample EXPORT_DIR OUT_DIR (--labels \"a,b\" [-n N] | --cond F --noise F) [--steps S] "
         "[--guidance W] [--apg-norm R] [--class-scale C] [--class-iters K] [--spacing trailing|leading] "
         "[--eta E [--step-noise F]] [--seed K]");
  std::string ex = argv[1], out = argv[2], labels, cond_file, noise_file, step_noise_file;
  std::string spacing = "trailing";  // = python.core.diffusion.DDIM's default
  int n = 8, steps = 20, repeat = 1;
  int iters = 1;  // = python.core.diffusion.DEFAULT_CLASS_ITERS (descent steps on x_0 per sampler step)
  double w = 5.0;  // = python.core.diffusion.DEFAULT_GUIDANCE
  double apg = 5.0;  // = python.core.diffusion.DEFAULT_APG_NORM (0: classifier-free guidance)
  double cls = 2.0;  // = python.core.diffusion.DEFAULT_CLASS_SCALE (0: no classifier guidance)
  double eta = 0.0;  // DDIM's noise, as python.core.diffusion.DDIM's eta (0: deterministic)
  uint64_t seed = 0;
  if ((argc - 3) % 2) fail(std::string("option ") + argv[argc - 1] + " has no value");
  for (int i = 3; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--labels") labels = v;
    else if (k == "-n") n = whole(k, v);
    else if (k == "--steps") steps = whole(k, v);
    else if (k == "--guidance") w = real(k, v);
    else if (k == "--apg-norm") apg = real(k, v);
    else if (k == "--class-scale") cls = real(k, v);
    else if (k == "--class-iters") iters = whole(k, v);
    else if (k == "--spacing") spacing = v;
    else if (k == "--eta") eta = real(k, v);
    else if (k == "--step-noise") step_noise_file = v;
    else if (k == "--seed") seed = unsigned64(k, v);
    else if (k == "--cond") cond_file = v;
    else if (k == "--noise") noise_file = v;
    else if (k == "--repeat") repeat = whole(k, v);
    else fail("unknown option " + k);
  }
  torch::NoGradGuard no_grad;
  auto sched = read_lines(ex + "/schedule.txt");  // line 0: "T C H W prediction", then alpha_bar[0..T-1]
  std::istringstream head(sched[0]);
  int64_t T = 0, C = 0, H = 0, W = 0;
  std::string prediction;
  head >> T >> C >> H >> W >> prediction;
  if (prediction != "epsilon" && prediction != "v_prediction") fail(ex + "/schedule.txt: bad header '" + sched[0] + "'");
  if ((int64_t)sched.size() != T + 1) fail(ex + "/schedule.txt: expected " + std::to_string(T) + " alpha_bar values");
  std::vector<double> ab(T);
  for (int64_t t = 0; t < T; ++t) ab[t] = std::stod(sched[t + 1]);
  if (steps < 1 || steps > T) fail("--steps must be in 1.." + std::to_string(T));
  if (spacing != "trailing" && spacing != "leading")
    fail("--spacing must be trailing or leading, got '" + spacing + "'");
  if (repeat < 1) fail("--repeat must be >= 1");
  if (n < 1) fail("-n must be >= 1");
  if (!(apg >= 0)) fail("--apg-norm must be 0 (classifier-free guidance), a positive norm cap or inf");
  if (!(cls >= 0 && std::isfinite(cls))) fail("--class-scale must be 0 (no classifier guidance) or a positive scale");
  if (iters < 1 || iters > 16)  // 16 = python.core.diffusion.MAX_CLASS_ITERS
    fail("--class-iters must be a whole number of descent steps in 1..16");
  if (!(eta >= 0 && eta <= 1)) fail("--eta must be in [0, 1] (0: deterministic DDIM)");
  if (!step_noise_file.empty() && eta == 0) fail("--step-noise is DDIM's noise per step; it needs --eta > 0");

  // a layout denoiser (python/core/layout.py) reads each class's place beside the label set: layout.txt holds the
  // width of its condition rows (24 + 72); the places are drawn by the Python side, which writes --cond files
  int64_t cond_dim = 24;
  if (std::ifstream(ex + "/layout.txt")) cond_dim = std::stoll(read_lines(ex + "/layout.txt").at(0));
  torch::Tensor cond, x;
  if (!cond_file.empty()) {
    cond = read_f32(cond_file, {cond_dim});
    x = read_f32(noise_file, {C, H, W});
    if (x.size(0) != cond.size(0)) fail("--noise and --cond hold different numbers of items");
  } else {
    if (cond_dim != 24)
      fail("this export's denoiser reads where each object stands beside the labels (layout.txt: condition rows of " +
           std::to_string(cond_dim) + " floats); give --cond and --noise files whose rows carry the places, as "
           "python -m runtime.generate --save-cond writes them");
    auto names = read_lines(ex + "/labels.txt");
    cond = torch::zeros({n, (int64_t)names.size()});
    std::stringstream ss(labels);
    for (std::string name; std::getline(ss, name, ',');) {
      name.erase(0, name.find_first_not_of(' '));
      name.erase(name.find_last_not_of(' ') + 1);
      auto it = std::find(names.begin(), names.end(), name);
      if (it == names.end()) fail("unknown label '" + name + "'; see " + ex + "/labels.txt for the valid names");
      cond.index_put_({torch::indexing::Slice(), it - names.begin()}, 1.0);
    }
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    x = torch::empty({n, C, H, W});
    for (auto* p = x.data_ptr<float>(), *e = p + x.numel(); p != e; ++p) *p = normal(rng);
  }
  auto denoiser = torch::jit::load(ex + "/denoiser.ts");
  auto decoder = torch::jit::load(ex + "/decoder.ts");
  torch::jit::Module class_grad;
  if (cls > 0) {
    if (!std::ifstream(ex + "/class_grad.ts"))
      fail(ex + "/class_grad.ts: not found (the guidance classifier, weights/guide, exported by `python "
           "export/to_onnx.py --format both`); give --class-scale 0 to sample without classifier guidance");
    class_grad = torch::jit::load(ex + "/class_grad.ts");
  }
  const bool v_pred = prediction == "v_prediction";

  const int64_t N = x.size(0);
  torch::Tensor z;  // DDIM's noise per step (steps x N x C x H x W), drawn before the timed part
  if (eta > 0) {
    if (!step_noise_file.empty()) {
      z = read_f32(step_noise_file, {C, H, W});
      if (z.size(0) != steps * N)
        fail("--step-noise holds " + std::to_string(z.size(0)) + " latents; --steps x items is " +
             std::to_string(steps * N));
      z = z.view({steps, N, C, H, W});
    } else {
      std::seed_seq streams{seed, uint64_t(1)};  // a stream of its own, not x_T's
      std::mt19937_64 rng(streams);
      std::normal_distribution<float> normal;
      z = torch::empty({steps, N, C, H, W});
      for (auto* p = z.data_ptr<float>(), *e = p + z.numel(); p != e; ++p) *p = normal(rng);
    }
  }
  std::vector<int64_t> ts(steps);  // python.core.diffusion.DDIM's timesteps; step i goes to ts[i + 1], the last to x_0
  for (int i = 0; i < steps; ++i)
    ts[i] = spacing == "leading" ? int64_t(steps - 1 - i) * (T / steps)
                                 : int64_t(std::nearbyint(T - i * (double(T) / steps))) - 1;
  auto both = torch::cat({cond, torch::zeros_like(cond)});
  auto labels_of = cond.slice(1, 0, 24);  // what the guidance classifier reads: the label set alone
  auto sample = [&](torch::Tensor x) {  // noise -> images: the timed part
    for (int i = 0; i < steps; ++i) {
      const int64_t t = ts[i], prev = i + 1 < steps ? ts[i + 1] : -1;
      const double a_t = ab[t], a_prev = prev >= 0 ? ab[prev] : 1.0;
      auto tt = torch::full({2 * N}, t, torch::kInt64);
      auto o = denoiser.forward({torch::cat({x, x}), tt, both}).toTensor();
      const double sa = std::sqrt(a_t), ss_ = std::sqrt(1 - a_t);
      auto oc = o.slice(0, 0, N), ou = o.slice(0, N);
      auto to_x0 = [&](const torch::Tensor& y) { return v_pred ? sa * x - ss_ * y : (x - ss_ * y) / sa; };
      auto from_x0 = [&](const torch::Tensor& x0) { return v_pred ? (sa * x - x0) / ss_ : (x - sa * x0) / ss_; };
      torch::Tensor out;
      if (apg == 0 || w == 1.0) {
        out = ou + w * (oc - ou);  // classifier-free: uncond + w (cond - uncond)
      } else {  // projected: on the predicted x_0, the update capped and made orthogonal to x0_c
        auto norm = [](const torch::Tensor& y) {
          return y.flatten(1).norm(2, 1).clamp_min(1e-12).view({-1, 1, 1, 1});
        };
        auto x0c = to_x0(oc), d = x0c - to_x0(ou);
        if (std::isfinite(apg)) d = d * (apg / norm(d)).clamp_max(1.0);
        auto unit = x0c / norm(x0c);
        d = d - (d * unit).sum({1, 2, 3}, true) * unit;
        out = from_x0(x0c + (w - 1) * d);
      }
      if (cls > 0) {  // classifier guidance: x_0 down the guidance classifier's gradient for the requested labels,
        auto x0g = to_x0(out);  // `iters` steps, each gradient taken where the last step left x_0
        for (int k = 0; k < iters; ++k) x0g = x0g - cls * class_grad.forward({x0g, labels_of}).toTensor();
        out = from_x0(x0g);
      }
      torch::Tensor x0, eps;
      if (v_pred) { x0 = sa * x - ss_ * out; eps = ss_ * x + sa * out; }
      else { x0 = (x - ss_ * out) / sa; eps = out; }
      const double sigma = eta > 0 ? eta * std::sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) : 0.0;
      x = std::sqrt(a_prev) * x0 + std::sqrt(std::max(1 - a_prev - sigma * sigma, 0.0)) * eps;
      if (sigma > 0) x = x + sigma * z[i];
    }
    return decoder.forward({x}).toTensor().contiguous();
  };
  torch::Tensor images;
  std::vector<double> seconds;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    images = sample(x);
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (repeat > 1) {
    std::cout << "{\"seconds\": [";
    for (size_t i = 0; i < seconds.size(); ++i) std::cout << (i ? ", " : "") << seconds[i];
    std::cout << "]}\n";
  }
  std::ofstream raw(out + "/images.f32", std::ios::binary);
  if (!raw) fail(out + ": cannot write there");
  raw.write(reinterpret_cast<const char*>(images.data_ptr<float>()), images.numel() * 4);
  for (int64_t i = 0; i < N; ++i) write_ppm(out + "/" + std::to_string(i) + ".ppm", images[i]);
  std::cout << "wrote " << N << " images to " << out << "\n";
  return 0;
}
