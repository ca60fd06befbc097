// CUDA launchers; streams travel as opaque pointers so that C++ callers need no CUDA headers.
#pragma once

#include "kernels.h"

namespace nic {

void patchify_cuda(const PatchifyArgs& args, void* stream);
void scatter_cuda(const ScatterArgs& args, void* stream);
int device_count();  // 0 when there is no driver or device

}  // namespace nic
