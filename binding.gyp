{
  "targets": [
    {
      "target_name": "trellis",
      "sources": [
        "native/addon.cc",
        "native/common/bulk_copy.cc",
        "native/common/host_mappings.cc",
        "native/loop/busy_poll.cc",
        "native/store/store.cc",
        "native/store/store_binding.cc",
        "native/collective/shm_communicator.cc",
        "native/collective/communicator_binding.cc",
        "native/channel/channel.cc",
        "native/channel/channel_binding.cc",
        "native/channel/connection_ring.cc",
        "native/channel/connection_ring_binding.cc",
        "native/cuda/driver.cc",
        "native/cuda/memory.cc",
        "native/cuda/completion.cc",
        "native/cuda/cuda_binding.cc",
        "native/nccl/library.cc",
        "native/nccl/nccl_binding.cc",
        "native/kernels/cpu_kernels.cc",
        "native/kernels/kernels_binding.cc",
        "native/kernels/thread_pool.cc",
        "native/kernels/device_kernels.cc",
        "native/kernels/device_kernels_binding.cc",
        "native/cuda/cublas.cc",
        "native/image/jpeg_decoder.cc",
        "native/image/png_decoder.cc",
        "native/image/jpeg_encoder.cc",
        "native/image/png_encoder.cc",
        "native/image/resize.cc",
        "native/image/image_binding.cc"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "native"
      ],
      "defines": [
        "NAPI_VERSION=8",
        "NODE_ADDON_API_DISABLE_DEPRECATED",
        "NAPI_CPP_EXCEPTIONS"
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-Wa,-I<(module_root_dir)/native/kernels/cuda", "-std=c++20", "-O3", "-fexceptions", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
      "libraries": ["-ldl", "-lpthread", "-lrt"]
    }
  ]
}
