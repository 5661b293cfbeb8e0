#pragma once

#include <napi.h>

namespace trellis::image {

// Sets exports.image = { probeJpeg, decodeJpeg, pngDataSize, reconstructPng, resize }: synchronous
// decoding for the worker that reads the file (see lib/image for the rest of each format).
void RegisterImageBinding(Napi::Env env, Napi::Object exports);

}  // namespace trellis::image
