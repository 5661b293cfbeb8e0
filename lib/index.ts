/** trellis: the public API. Everything a user imports comes from here. */
export {
  TrellisError,
  InvalidArgumentError,
  NativeSystemError,
  ObjectStoreError,
  ObjectExistsError,
  ObjectNotFoundError,
  ObjectStateError,
  ObjectStoreFullError,
  ObjectTooLargeError,
  GetTimeoutError,
  StoreClosedError,
} from './errors.js';
export { ObjectStore, ObjectView, ObjectBuilder, isStoreMemory } from './store/object-store.js';
export type { ObjectStoreOptions, StoreStats, ObjectState, PinnedObjectInfo } from './store/object-store.js';
export { newObjectId, isObjectId } from './store/object-id.js';
export type { ObjectId } from './store/object-id.js';
export {
  TaskError,
  WorkerCrashedError,
  ActorDiedError,
  ObjectLostError,
  NodeLostError,
  OwnerDiedError,
  InfeasibleTaskError,
  ClusterError,
  TaskCancelledError,
  NotInitializedError,
  RegistrationError,
  SerializationError,
  QueueFullError,
  QueueEmptyError,
} from './errors.js';
export type { RemoteErrorInfo } from './errors.js';
export { init, shutdown, isInitialized, get, put, wait, free, cancel, kill, getActor, getRuntimeContext, state, objectLocations, memorySummary, listTasks, timeline, events, placementGroup, removePlacementGroup, waitForNodes, requestResources } from './core/api.js';
export type { TaskInfo, TaskAttempt, TaskState, ListTasksOptions, TraceEvent } from './core/task-events.js';
export { NodeAgent } from './core/node-agent.js';
export type { NodeAgentOptions } from './core/node-agent.js';
export { Broker } from './core/broker.js';
export { brokerStatus, submitJob, listJobs, jobStatus, jobLogs, stopJob, type JobCallOptions } from './core/broker-client.js';
export type { JobInfo, JobState, JobSubmission } from './core/jobs.js';
export type { RuntimeEnvironment } from './core/code-package.js';
export { CodePackageError } from './errors.js';
export type { BrokerOptions } from './core/broker.js';
export type { StatusMessage as BrokerStatus, HostStatus, DriverStatus } from './core/broker-protocol.js';
export { HostAgent } from './core/host-agent.js';
export type { HostAgentOptions } from './core/host-agent.js';
export type { ClusterOptions, BrokerInfo } from './core/broker-client.js';
export type { ClusterSession } from './core/api.js';
export { serveMetrics, metricsText, MetricsServer } from './core/metrics.js';
export { Counter, Gauge, Histogram } from './core/user-metrics.js';
export type { MetricOptions, HistogramOptions, MetricTags } from './core/user-metrics.js';
export type { PlacementGroup, PlacementGroupOptions, PlacementStrategy } from './core/placement-group.js';
export type { Resources } from './core/resources.js';
export type { InitOptions, ClusterState, ObjectLocation } from './core/cluster.js';
export type { MemorySummary, ObjectMemoryEntry, ObjectPin } from './core/memory-summary.js';
export type { ListenOptions } from './core/node-listener.js';
export { remote } from './core/registry.js';
export type { RemoteFunction, ActorClass, ActorHandle, ActorMethod, RemoteArgs, RemoteResult, ReturnRefs } from './core/registry.js';
export { ObjectRef } from './core/object-ref.js';
export { ObjectRefGenerator } from './core/object-ref-generator.js';
export { ActorPool } from './core/actor-pool.js';
export { Queue, QueueActor } from './core/queue.js';
export type { QueueOptions, QueueWaitOptions } from './core/queue.js';
export type { PoolCall, PoolNextOptions } from './core/actor-pool.js';
export type { StreamNextOptions } from './core/object-ref-generator.js';
export type { RefOr } from './core/object-ref.js';
export type { TaskOptions, ActorOptions, ActorCallOptions, StreamingOptions, ReturnsOptions, Recompute, SchedulingStrategy, TensorTransport, WorkerRuntimeEnvironment } from './core/options.js';
export type { RuntimeContext } from './core/runtime-context.js';
export { CommunicatorError } from './errors.js';
export { Tensor, parseDevice } from './gpu/tensor.js';
export type { Device, TensorOptions } from './gpu/tensor.js';
export type { DType, HostArray } from './gpu/dtype.js';
export type { Communicator, ReduceOp } from './gpu/communicator.js';
export { CpuCommunicator } from './gpu/cpu-communicator.js';
export { createCollectiveGroup, getCommunicator, CollectiveGroup } from './gpu/collective.js';
export type { CollectiveBackend, CollectiveGroupOptions } from './gpu/collective.js';
export { cuda } from './gpu/cuda.js';
export { reclaimIpcMemory } from './gpu/ipc-reclaim.js';
export type { CudaApi, CudaEvent, DeviceInfo, DeviceMemory, IpcHandle, IpcStats, PageLockStats, Stream } from './gpu/cuda-types.js';
export { ChannelError } from './errors.js';
export { InputNode, MultiOutputNode, ClassMethodNode, CollectiveNode, DAGNode, collective } from './dag/nodes.js';
export type { CompileOptions, EdgeTransport } from './dag/nodes.js';
export { CompiledGraph, CompiledRef } from './dag/compiled-graph.js';
export { GraphValidationError } from './dag/compile.js';
export { nccl, NcclCommunicator } from './gpu/nccl.js';
export { CudaError, NcclError } from './errors.js';
export { Dataset, fromItems, fromArrow, readDatasource } from './data/dataset.js';
export type { TransformOptions, MapBatchesOptions, ReadOptions, IterBatchesOptions, SortOptions, ShuffleOptions, AddColumnOptions, JoinOptions, WriteOptions } from './data/dataset.js';
export { DataIterator } from './data/streaming-split.js';
export type { DataIteratorBatchOptions } from './data/streaming-split.js';
export type { CheckpointOptions, CheckpointStats } from './data/checkpoint.js';
export type { WriteMode } from './data/formats/files.js';
export type { JoinType } from './data/exchange.js';
export { GroupedData } from './data/grouped.js';
export type { MapGroupsOptions } from './data/grouped.js';
export { Count, Sum, Min, Max, Mean, Std, AbsMax, Unique, Quantile, ApproximateQuantile } from './data/aggregate.js';
export type { AggregateFn, AggregateOptions, AggregationKind } from './data/aggregate.js';
export { range, RangeDatasource, readJsonl, readCsv, readArrow, readParquet, readText, readBinaryFiles, readImages, readWebDataset } from './data/sources.js';
export {
  JsonlDatasource, CsvDatasource, ArrowDatasource, ParquetDatasource, TextDatasource, BinaryDatasource, JsonlDatasink, CsvDatasink, ArrowDatasink, ParquetDatasink,
  WebDatasetDatasource, WebDatasetDatasink, ImageDatasource, ImageDatasink,
} from './data/formats/index.js';
export type {
  Paths, JsonlReadOptions, JsonlWriteOptions, CsvReadOptions, ArrowReadOptions, ParquetReadOptions, TextReadOptions, BinaryReadOptions, Compression, CompressionOption,
  PartitionReadOptions, PartitionValues,
  CsvWriteOptions, ArrowWriteOptions, ParquetWriteOptions, WrittenFile, WebDatasetReadOptions, WebDatasetWriteOptions, ImageReadOptions, ImageWriteOptions, WrittenImages,
} from './data/formats/index.js';
export { Datasource, Datasink, ReadTask } from './data/datasource.js';
export { LocalFileSystem } from './data/filesystem/file-system.js';
export type { FileSystem, RandomAccessFile, WritableFile, ListedFile } from './data/filesystem/file-system.js';
export { S3FileSystem } from './data/filesystem/s3.js';
export type { S3FileSystemOptions } from './data/filesystem/s3.js';
export { filterBlock } from './data/row-filter.js';
export type { RowFilter, RowPredicate, RowFilterOperator, RowFilterValue, Clauses as RowFilterClauses } from './data/row-filter.js';
export type { WriteContext, ReadTaskMetadata, ReadResult, ReadOutput } from './data/datasource.js';
export { DataContext } from './data/executor.js';
export type { ExecutionOptions, JobStats } from './data/executor.js';
export type { Block, Row, BatchFormat, BlockMetadata, BatchColumns, FormattedColumns } from './data/block.js';
export { tensorColumnInfo, FIXED_SHAPE_TENSOR, VARIABLE_SHAPE_TENSOR } from './data/tensor-column.js';
export type { TensorColumnInfo } from './data/tensor-column.js';
export { decodeImage, resizeImage, imageInfo, imageFormat, DEFAULT_MAX_IMAGE_PIXELS } from './image/decode.js';
export type { ImageMode, ImageFormat, ImageFit, ImageInfo, DecodeImageOptions } from './image/decode.js';
export { normalizeImages, IMAGENET_MEAN, IMAGENET_STD } from './image/normalize.js';
export { encodeImage } from './image/encode.js';
export type { EncodeImageOptions, EncodedImageFormat } from './image/encode.js';
export type { NormalizeImagesOptions } from './image/normalize.js';
export { rowsToBlock, blockToRows } from './data/block.js';
export type { JobProgress, OperatorProgress, ProgressReporter } from './data/progress-types.js';
export { DataError, DataStallError } from './errors.js';
export { ModelLoadError, GrammarError, HttpRequestError, StorageError, ImageError } from './errors.js';
export { ModelReplica } from './llm/replica.js';
export type { ModelReplicaOptions, GenerateRequest, Generation, GeneratedToken, ReplicaStats, EmbedRequest, Embedding, ClassifyRequest, Classification } from './llm/replica.js';
export { buildLLMProcessor, LLMEngine } from './llm/processor.js';
export type { LLMProcessorOptions } from './llm/processor.js';
export { buildHttpRequestProcessor, HttpRequestEngine } from './llm/http-processor.js';
export type { HttpRequestProcessorOptions } from './llm/http-processor.js';
export { buildDeploymentProcessor, DeploymentRequestEngine } from './llm/deployment-processor.js';
export type { DeploymentProcessorOptions } from './llm/deployment-processor.js';
export type { RequestProcessorOptions } from './llm/request-engine.js';
export { DecoderShard } from './llm/shard.js';
export { DeviceKernels, DeviceBuffer, cudaKernelImageBytes } from './llm/device-kernels.js';
export type { KernelBackend, ElementType, DeviceTensor, StepLayout, AttentionShape } from './llm/device-kernels.js';
export { DeviceLayers } from './llm/device-layers.js';
export type { DeviceLayersOptions, LayerStepSequence } from './llm/device-layers.js';
export type { ShardSpec, StepMessage, StepResult, StepSequence } from './llm/shard.js';
export { planSharding } from './llm/plan.js';
export type { ParallelismOptions, ShardingPlan, StagePlan } from './llm/plan.js';
export { checkDecoderConfig, configFromHuggingFace, readCheckpointConfig, readEndOfSequenceTokens } from './llm/config.js';
export type { DecoderConfig, ResolvedDecoderConfig, RopeScaling, Architecture } from './llm/config.js';
export type { SamplingParameters } from './llm/sampling.js';
export { Checkpoint, writeSafetensors, writeShardedCheckpoint } from './llm/safetensors.js';
export type { TensorInfo, SliceOptions, WritableTensor } from './llm/safetensors.js';
export { Tokenizer } from './llm/tokenizer.js';
export { ChatTemplate } from './llm/chat-template.js';
export { choiceConstraint } from './llm/choices.js';
export { TokenGuide } from './llm/guided/token-guide.js';
export type { TokenConstraint } from './llm/guided/token-guide.js';
export { TokenMask } from './llm/guided/token-mask.js';
export { jsonSchemaToRegex } from './llm/guided/json-schema.js';
export type { JsonSchemaOptions } from './llm/guided/json-schema.js';
export type { GuidedDecoding } from './llm/guided/guided-decoding.js';
export { readAdapter } from './llm/lora.js';
export type { DraftSpeculationOptions, NgramSpeculationOptions, SpeculationOptions } from './llm/speculation.js';
export type { Beam, BeamSearchOptions, BeamSearchRequest, BeamSearchResult } from './llm/beam-search.js';
export type { AdapterInfo, LayerAdapter, LowRankUpdate } from './llm/lora.js';
export type { ChatMessage, ChatTemplateRenderOptions, ChatTemplateLoadOptions } from './llm/chat-template.js';
export type { EncodeOptions, DecodeOptions } from './llm/tokenizer.js';
export type { WeightDType, HalfMatrix, WeightMatrix } from './llm/kernels.js';
export * as serve from './serve/index.js';
export type { DeploymentHandle, HandleArgs, HandleResult } from './serve/handle.js';
export { DeploymentResponse, DeploymentResponseGenerator } from './serve/handle.js';
export { Deployment, Application } from './serve/deployment.js';
export type { DeploymentOptions, AutoscalingConfig } from './serve/options.js';
export { HttpRequest, HttpResponse, HttpError } from './serve/http-messages.js';
export type { BatchOptions, BatchedFunction } from './serve/batching.js';
export type { HttpOptions } from './serve/http-proxy.js';
export type { NodeProxyAddress } from './serve/node-proxy.js';
export type { StartOptions, RunOptions, ServeStatus, ApplicationStatus, DeploymentStatus } from './serve/index.js';
export { DeploymentError, BackPressureError } from './errors.js';
export { buildOpenAIApp, OpenAIServer } from './llm/openai-server.js';
export type { OpenAIAppOptions } from './llm/openai-server.js';
