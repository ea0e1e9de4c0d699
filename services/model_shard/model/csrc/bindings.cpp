// The Python module of the native kernels. Plain pybind11 functions rather than torch.ops
// registrations: a call through torch's dispatcher costs ~2 us of argument handling from Python,
// a pybind call ~0.2 us, and one decode step makes ~200 of them. Each call lets go of the GIL
// while it runs, so the shard's gRPC threads keep serving during a step.

#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode_attention", &llmmesh::paged_decode_attention, release());
  m.def("add_rms_norm", &llmmesh::add_rms_norm, release());
  m.def("rope_and_cache", &llmmesh::rope_and_cache, release());
  m.def("silu_and_mul", &llmmesh::silu_and_mul, release());
  m.def("vnni_supported", &llmmesh::vnni_supported);
  m.def("int4_linear", &llmmesh::int4_linear, release());
  m.def("int4_pack_weight", &llmmesh::int4_pack_weight, release());
  m.def("int8_linear", &llmmesh::int8_linear, release());
  m.def("int8_pack_weight", &llmmesh::int8_pack_weight, release());
  m.def("dense_supported", &llmmesh::dense_supported);
  m.def("dense_uses_bf16_instructions", &llmmesh::dense_uses_bf16_instructions);
  m.def("dense_pack_weight", &llmmesh::dense_pack_weight, release());
  m.def("dense_linear", &llmmesh::dense_linear, release());
  m.def("apply_token_bitmask", &llmmesh::apply_token_bitmask, release());
}
