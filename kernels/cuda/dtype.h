// Element types the kernels accept; the Python side passes them as these integers.
#pragma once

namespace cnnfast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace cnnfast
