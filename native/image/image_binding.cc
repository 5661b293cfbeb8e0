// Node-API face of the image decoders. Every argument is checked here: the decoders index raw
// memory with these numbers.
#include "image/image_binding.h"

#include <cstring>
#include <string>
#include <vector>

#include "common/js_error.h"
#include "image/jpeg_decoder.h"
#include "image/jpeg_encoder.h"
#include "image/png_encoder.h"
#include "image/png_decoder.h"
#include "image/resize.h"

namespace trellis::image {
namespace {

Bytes BytesArgument(const Napi::Value& value, const char* name, bool optional = false) {
  if (optional && (value.IsNull() || value.IsUndefined())) return {};
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throw InvalidArgument(std::string(name) + " must be a Uint8Array");
  }
  auto array = value.As<Napi::Uint8Array>();
  return {array.Data(), array.ElementLength()};
}

uint32_t DimensionArgument(const Napi::Value& value, const char* name, uint32_t low, uint32_t high) {
  if (!value.IsNumber()) throw InvalidArgument(std::string(name) + " must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= low && number <= high) || number != static_cast<double>(static_cast<uint32_t>(number))) {
    throw InvalidArgument(std::string(name) + " must be an integer from " + std::to_string(low) + " to " + std::to_string(high));
  }
  return static_cast<uint32_t>(number);
}

uint32_t ChannelsArgument(const Napi::Value& value) {
  uint32_t channels = DimensionArgument(value, "channels", 1, 4);
  if (channels == 2) throw InvalidArgument("channels must be 1, 3 or 4");
  return channels;
}

Napi::Uint8Array ToArray(Napi::Env env, const std::vector<uint8_t>& bytes) {
  Napi::ArrayBuffer buffer = Napi::ArrayBuffer::New(env, bytes.size());
  if (!bytes.empty()) std::memcpy(buffer.Data(), bytes.data(), bytes.size());
  return Napi::Uint8Array::New(env, bytes.size(), buffer, 0);
}

Napi::Object ToObject(Napi::Env env, const DecodedImage& image) {
  Napi::Object result = Napi::Object::New(env);
  result.Set("width", image.width);
  result.Set("height", image.height);
  result.Set("channels", image.channels);
  result.Set("pixels", ToArray(env, image.pixels));
  return result;
}

PngHeader HeaderArgument(const Napi::Value& value) {
  if (!value.IsObject()) throw InvalidArgument("header must be an object");
  Napi::Object object = value.As<Napi::Object>();
  PngHeader header;
  header.width = DimensionArgument(object.Get("width"), "header.width", 0, 0x7FFFFFFF);
  header.height = DimensionArgument(object.Get("height"), "header.height", 0, 0x7FFFFFFF);
  header.bit_depth = DimensionArgument(object.Get("bitDepth"), "header.bitDepth", 0, 255);
  header.color_type = DimensionArgument(object.Get("colorType"), "header.colorType", 0, 255);
  header.interlace = DimensionArgument(object.Get("interlace"), "header.interlace", 0, 255);
  return header;
}

Napi::Value ProbeJpegFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    Bytes bytes = BytesArgument(info[0], "bytes");
    ImageSize size = ProbeJpeg(bytes.data, bytes.size);
    Napi::Object result = Napi::Object::New(info.Env());
    result.Set("width", size.width);
    result.Set("height", size.height);
    result.Set("channels", size.channels);
    return result;
  });
}

Napi::Value DecodeJpegFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    Bytes bytes = BytesArgument(info[0], "bytes");
    uint32_t channels = ChannelsArgument(info[1]);
    if (!info[2].IsNumber() || info[2].As<Napi::Number>().DoubleValue() < 0) throw InvalidArgument("maxPixels must be a non-negative number");
    auto max_pixels = static_cast<uint64_t>(info[2].As<Napi::Number>().DoubleValue());
    Napi::ArrayBuffer buffer;
    ImageSize size;
    if (info.Length() > 3 && !info[3].IsUndefined()) {
      // Resized on the way out: the full-size pixels stay in a buffer this thread reuses, and only
      // the small result is a new ArrayBuffer.
      uint32_t out_height = DimensionArgument(info[3], "outHeight", 1, 1 << 20);
      uint32_t out_width = DimensionArgument(info[4], "outWidth", 1, 1 << 20);
      // Draft: decode reduced in the DCT domain to no smaller than the target, then resize.
      bool draft = info.Length() > 5 && info[5].ToBoolean().Value();
      thread_local std::vector<uint8_t> decoded;
      size = DecodeJpegInto(
          bytes.data, bytes.size, channels, max_pixels,
          [&](size_t length) {
            decoded.resize(length);
            return decoded.data();
          },
          draft ? out_width : 0, draft ? out_height : 0);
      buffer = Napi::ArrayBuffer::New(info.Env(), static_cast<size_t>(out_height) * out_width * channels);
      ResizeBilinearInto(decoded.data(), size.height, size.width, channels, out_height, out_width, static_cast<uint8_t*>(buffer.Data()));
      if (decoded.capacity() > (64u << 20)) std::vector<uint8_t>().swap(decoded);
      size.width = out_width;
      size.height = out_height;
    } else {
      // Decoded straight into the ArrayBuffer the tensor will view.
      size = DecodeJpegInto(bytes.data, bytes.size, channels, max_pixels, [&](size_t length) {
        buffer = Napi::ArrayBuffer::New(info.Env(), length);
        return static_cast<uint8_t*>(buffer.Data());
      });
    }
    Napi::Object result = Napi::Object::New(info.Env());
    result.Set("width", size.width);
    result.Set("height", size.height);
    result.Set("channels", size.channels);
    result.Set("pixels", Napi::Uint8Array::New(info.Env(), buffer.ByteLength(), buffer, 0));
    return result;
  });
}

Napi::Value PngDataSizeFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    return Napi::Number::New(info.Env(), static_cast<double>(PngDataSize(HeaderArgument(info[0]))));
  });
}

Napi::Value ReconstructPngFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    Bytes inflated = BytesArgument(info[0], "inflated");
    PngHeader header = HeaderArgument(info[1]);
    Bytes palette = BytesArgument(info[2], "palette", true);
    Bytes transparency = BytesArgument(info[3], "transparency", true);
    uint32_t channels = ChannelsArgument(info[4]);
    return ToObject(info.Env(), ReconstructPng(inflated, header, palette, transparency, channels));
  });
}

Napi::Value ResizeFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    Bytes pixels = BytesArgument(info[0], "pixels");
    uint32_t height = DimensionArgument(info[1], "height", 1, 1 << 20);
    uint32_t width = DimensionArgument(info[2], "width", 1, 1 << 20);
    uint32_t channels = DimensionArgument(info[3], "channels", 1, 64);
    uint32_t out_height = DimensionArgument(info[4], "outHeight", 1, 1 << 20);
    uint32_t out_width = DimensionArgument(info[5], "outWidth", 1, 1 << 20);
    if (static_cast<double>(height) * width * channels != static_cast<double>(pixels.size)) {
      throw InvalidArgument("pixels holds " + std::to_string(pixels.size) + " bytes, not height x width x channels = " +
                            std::to_string(static_cast<double>(height) * width * channels));
    }
    Napi::ArrayBuffer buffer = Napi::ArrayBuffer::New(info.Env(), static_cast<size_t>(out_height) * out_width * channels);
    ResizeBilinearInto(pixels.data, height, width, channels, out_height, out_width, static_cast<uint8_t*>(buffer.Data()));
    return Napi::Uint8Array::New(info.Env(), buffer.ByteLength(), buffer, 0);
  });
}

// pixels, height, width, channels: checked together (the encoders read height x width x channels).
struct PixelsArgument {
  Bytes pixels;
  uint32_t height;
  uint32_t width;
  uint32_t channels;
};

PixelsArgument PixelsArguments(const Napi::CallbackInfo& info) {
  PixelsArgument argument{BytesArgument(info[0], "pixels"), DimensionArgument(info[1], "height", 1, 1 << 20), DimensionArgument(info[2], "width", 1, 1 << 20),
                          DimensionArgument(info[3], "channels", 1, 4)};
  if (static_cast<double>(argument.height) * argument.width * argument.channels != static_cast<double>(argument.pixels.size)) {
    throw InvalidArgument("pixels holds " + std::to_string(argument.pixels.size) + " bytes, not height x width x channels");
  }
  return argument;
}

Napi::Value EncodeJpegFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    PixelsArgument image = PixelsArguments(info);
    if (image.channels == 2) throw InvalidArgument("JPEG encoding takes 1, 3 or 4 channels");
    JpegEncodeOptions options;
    options.quality = DimensionArgument(info[4], "quality", 1, 100);
    options.subsample_chroma = info[5].ToBoolean().Value();
    return ToArray(info.Env(), EncodeJpeg(image.pixels.data, image.height, image.width, image.channels, options));
  });
}

Napi::Value FilterPngFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    PixelsArgument image = PixelsArguments(info);
    return ToArray(info.Env(), FilterPngRows(image.pixels.data, image.height, image.width, image.channels));
  });
}

}  // namespace

void RegisterImageBinding(Napi::Env env, Napi::Object exports) {
  Napi::Object image = Napi::Object::New(env);
  image.Set("probeJpeg", Napi::Function::New(env, ProbeJpegFunction, "probeJpeg"));
  image.Set("decodeJpeg", Napi::Function::New(env, DecodeJpegFunction, "decodeJpeg"));
  image.Set("pngDataSize", Napi::Function::New(env, PngDataSizeFunction, "pngDataSize"));
  image.Set("reconstructPng", Napi::Function::New(env, ReconstructPngFunction, "reconstructPng"));
  image.Set("resize", Napi::Function::New(env, ResizeFunction, "resize"));
  image.Set("encodeJpeg", Napi::Function::New(env, EncodeJpegFunction, "encodeJpeg"));
  image.Set("filterPng", Napi::Function::New(env, FilterPngFunction, "filterPng"));
  exports.Set("image", image);
}

}  // namespace trellis::image
