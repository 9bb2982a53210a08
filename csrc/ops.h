// Host entry points of every op, bound in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

void silu_and_mul(at::Tensor& out, const at::Tensor& input);
void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double eps);
