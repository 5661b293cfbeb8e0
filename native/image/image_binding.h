#pragma once

#include <napi.h>

namespace trellis::image {

// Sets exports.image = { probeJpeg, decodeJpeg, pngDataSize, reconstructPng, resize, encodeJpeg,
// filterPng }: synchronous decoding and encoding for the worker that reads or writes the file (see
// lib/image for the rest of each format).
void RegisterImageBinding(Napi::Env env, Napi::Object exports);

}  // namespace trellis::image
