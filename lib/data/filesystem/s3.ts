/**
 * S3 and S3-compatible object storage (MinIO, Ceph, R2, GCS's XML API) as a FileSystem, over
 * node's fetch with SigV4 signing: listings page by page, reads as ranged GETs with a read-ahead
 * window, writes as one PUT or a multipart upload that only appears when complete. Credentials
 * and region come from the options, else the environment (AWS_ACCESS_KEY_ID, ...), else the
 * shared credentials file, else AWS's providers (web identity, container endpoint, instance
 * metadata: s3-credentials.ts), refreshed before they expire, else requests go unsigned (public
 * buckets).
 */
import { InvalidArgumentError, StorageError } from '../../errors.js';
import { registerPortableClass } from '../../core/serialization.js';
import { credentialsFromProviders, profileSettings, type ExpiringCredentials } from './s3-credentials.js';
import { escapeXml, xmlValue } from './s3-xml.js';
import { canonicalQuery, EMPTY_PAYLOAD_HASH, amzDate, sha256Hex, signRequest, uriEncode, type Credentials } from './s3-signing.js';
import { registerFileSystem, type BlobLike, type FileSystem, type ListedFile, type RandomAccessFile, type WritableFile } from './file-system.js';

export interface S3FileSystemOptions {
  /** The bucket's region (default: AWS_REGION, AWS_DEFAULT_REGION, else us-east-1). */
  region?: string;
  /**
   * The service's base URL, for S3-compatible stores (`http://localhost:9000`); default: the
   * AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL variable, else AWS's regional endpoint.
   */
  endpoint?: string;
  /** `endpoint/bucket/key` instead of `bucket.endpoint/key` (default: true with an endpoint, false on AWS). */
  forcePathStyle?: boolean;
  accessKeyId?: string;
  secretAccessKey?: string;
  sessionToken?: string;
  /** The profile of the shared credentials and config files: its keys, SSO role or credential_process (default: AWS_PROFILE, else 'default'). */
  profile?: string;
  /** Send requests unsigned even where credentials are found (public buckets). */
  anonymous?: boolean;
  /** A write's bytes per multipart part, 5 MiB to 5 GiB (default 8 MiB); smaller files are one PUT. */
  partBytes?: number;
  /** Parts of one write uploaded at once (default 4). */
  partsInFlight?: number;
  /** Tries per request for 5xx, throttling and network failures (default 5). */
  maxAttempts?: number;
  /** How long a request may wait for its answer's headers (default 60 s). */
  requestTimeoutMs?: number;
}

/** What travels to a worker: everything resolved on the sending side, credentials included. */
interface ResolvedOptions {
  region: string;
  endpoint: string | undefined;
  forcePathStyle: boolean;
  /** Keys given, or found in the environment or the shared credentials file. */
  credentials: Credentials | undefined;
  /** None of those and not anonymous: AWS's providers are asked, in the process that signs. */
  fromProviders: boolean;
  /** What the providers last gave the sender: a worker signs with them until they near their end. */
  providerCredentials?: ExpiringCredentials;
  /** The profile whose SSO role or credential_process the providers ask. */
  profile: string;
  partBytes: number;
  partsInFlight: number;
  maxAttempts: number;
  requestTimeoutMs: number;
}

const MIN_PART_BYTES = 5 << 20;
const MAX_PART_BYTES = 5 * 1024 ** 3;
/** CopyObject copies at most this much in one call; beyond it a multipart copy. */
const MAX_COPY_BYTES = 5 * 1024 ** 3;
const COPY_PART_BYTES = 512 << 20;
/** A ranged read fetches at least this much, so small sequential reads cost one request. */
const READ_AHEAD_BYTES = 4 << 20;
/** A read that reaches a file's end also fetches this much before it (a footer's length, then the footer). */
const TAIL_WINDOW_BYTES = 64 << 10;
const DELETES_IN_FLIGHT = 8;

const RETRIED_STATUSES = new Set([429, 500, 502, 503, 504]);
/** Temporary credentials are fetched again this long before they expire. */
const REFRESH_BEFORE_MS = 5 * 60_000;


/** The profile's keys from the shared credentials file, or its section in the config file, if they have them. */
function credentialsFromFile(profile: string): Credentials | undefined {
  const { settings } = profileSettings(profile);
  // A profile that assumes a role signs with the role's credentials, not the keys beside it.
  if (settings.role_arn || !settings.aws_access_key_id || !settings.aws_secret_access_key) return undefined;
  return { accessKeyId: settings.aws_access_key_id, secretAccessKey: settings.aws_secret_access_key, ...(settings.aws_session_token ? { sessionToken: settings.aws_session_token } : {}) };
}

function positiveInteger(value: unknown, name: string, fallback: number, min = 1, max = Number.MAX_SAFE_INTEGER): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new InvalidArgumentError(`S3FileSystem option '${name}' must be an integer from ${min} to ${max}, got ${JSON.stringify(value)}`);
  }
  return value;
}

function resolveOptions(options: S3FileSystemOptions): ResolvedOptions {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError(`S3FileSystem takes an options object, got ${options === null ? 'null' : typeof options}`);
  const environment = process.env;
  const endpoint = options.endpoint ?? environment.AWS_ENDPOINT_URL_S3 ?? environment.AWS_ENDPOINT_URL;
  if (endpoint !== undefined) {
    let url: URL;
    try {
      url = new URL(endpoint);
    } catch {
      throw new InvalidArgumentError(`S3FileSystem endpoint '${endpoint}' is not a URL (write it as http://host:port)`);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new InvalidArgumentError(`S3FileSystem endpoint '${endpoint}' must be http:// or https://`);
  }
  if ((options.accessKeyId === undefined) !== (options.secretAccessKey === undefined)) {
    throw new InvalidArgumentError('S3FileSystem takes accessKeyId and secretAccessKey together, or neither');
  }
  let credentials: Credentials | undefined;
  const profile = options.profile ?? environment.AWS_PROFILE ?? 'default';
  if (!options.anonymous) {
    if (options.accessKeyId !== undefined) {
      credentials = { accessKeyId: options.accessKeyId, secretAccessKey: options.secretAccessKey!, ...(options.sessionToken ? { sessionToken: options.sessionToken } : {}) };
    } else if (environment.AWS_ACCESS_KEY_ID && environment.AWS_SECRET_ACCESS_KEY) {
      credentials = {
        accessKeyId: environment.AWS_ACCESS_KEY_ID,
        secretAccessKey: environment.AWS_SECRET_ACCESS_KEY,
        ...(environment.AWS_SESSION_TOKEN ? { sessionToken: environment.AWS_SESSION_TOKEN } : {}),
      };
    } else {
      credentials = credentialsFromFile(profile);
    }
  }
  return {
    profile,
    region: options.region ?? environment.AWS_REGION ?? environment.AWS_DEFAULT_REGION ?? 'us-east-1',
    endpoint: endpoint?.replace(/\/+$/, ''),
    forcePathStyle: options.forcePathStyle ?? endpoint !== undefined,
    credentials,
    fromProviders: !options.anonymous && credentials === undefined,
    partBytes: positiveInteger(options.partBytes, 'partBytes', 8 << 20, MIN_PART_BYTES, MAX_PART_BYTES),
    partsInFlight: positiveInteger(options.partsInFlight, 'partsInFlight', 4, 1, 64),
    maxAttempts: positiveInteger(options.maxAttempts, 'maxAttempts', 5, 1, 20),
    requestTimeoutMs: positiveInteger(options.requestTimeoutMs, 'requestTimeoutMs', 60_000),
  };
}

interface S3Location {
  bucket: string;
  key: string;
}

function locate(path: string): S3Location {
  const match = /^s3:\/\/([^/]+)\/?(.*)$/i.exec(path);
  if (!match) throw new InvalidArgumentError(`'${path}' is not an S3 URL (s3://bucket/key)`, 'ERR_DATA_PATH');
  return { bucket: match[1], key: match[2] };
}

interface RequestSpec {
  method: 'GET' | 'HEAD' | 'PUT' | 'POST' | 'DELETE';
  location: S3Location;
  query?: Array<[string, string]>;
  headers?: Record<string, string>;
  body?: Uint8Array;
  /** Statuses answered to the caller rather than thrown (404 for a HEAD that finds nothing). */
  accept?: number[];
  /** What an error names (default: the object's URL). */
  display?: string;
}

/** Set while fromResolved constructs: the options to adopt instead of resolving. */
let adopting: ResolvedOptions | undefined;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** The wait before retry `retry` (1, 2, ...): doubling from 100 ms to at most 5 s, jittered down by up to half. */
const backoffMs = (retry: number): number => Math.min(5_000, 100 * 2 ** (retry - 1)) * (0.5 + Math.random() / 2);

const notFound = (path: string): StorageError => new StorageError('ERR_STORAGE_NOT_FOUND', `S3 object ${path} does not exist`, { url: path, status: 404, attempts: 1 });

async function collect(chunks: AsyncIterable<Uint8Array>): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of chunks) {
    parts.push(chunk);
    size += chunk.byteLength;
  }
  return parts.length === 1 ? parts[0] : Buffer.concat(parts, size);
}

export class S3FileSystem implements FileSystem {
  readonly scheme = 's3';
  readonly writesInPlace = false;
  readonly #options: ResolvedOptions;

  /** What AWS's providers gave (fromProviders): kept until it nears its end. */
  #provided: ExpiringCredentials | undefined;
  /** The providers were asked and none had credentials: requests go unsigned. */
  #noProvider = false;
  #refreshing: Promise<void> | undefined;

  constructor(options: S3FileSystemOptions = {}) {
    this.#options = adopting ?? resolveOptions(options);
    this.#provided = this.#options.providerCredentials;
  }

  /** The credentials to sign with now: static ones, or the providers', fetched again before they expire. */
  async #credentials(): Promise<Credentials | undefined> {
    const options = this.#options;
    if (!options.fromProviders) return options.credentials;
    const fresh = (candidate: ExpiringCredentials | undefined, margin: number): candidate is ExpiringCredentials =>
      candidate !== undefined && (candidate.expiration === undefined || candidate.expiration - Date.now() > margin);
    if (fresh(this.#provided, REFRESH_BEFORE_MS) || this.#noProvider) return this.#provided;
    this.#refreshing ??= credentialsFromProviders(options.region, process.env, options.profile)
      .then(
        (found) => {
          if (found) this.#provided = found.credentials;
          else if (!fresh(this.#provided, 0)) this.#noProvider = true;
        },
        (error: unknown) => {
          // A provider that fails while what it gave before still works: sign with that meanwhile.
          if (!fresh(this.#provided, 0)) throw error;
        },
      )
      .finally(() => {
        this.#refreshing = undefined;
      });
    await this.#refreshing;
    return fresh(this.#provided, 0) ? this.#provided : undefined;
  }

  /** @internal What travels to a worker: the options, with what the providers gave here. */
  portableOptions(): ResolvedOptions {
    return this.#provided ? { ...this.#options, providerCredentials: this.#provided } : this.#options;
  }

  /** @internal Made again in a worker from what the sender resolved (its environment is not read). */
  static fromResolved(options: ResolvedOptions): S3FileSystem {
    adopting = options;
    try {
      return new S3FileSystem();
    } finally {
      adopting = undefined;
    }
  }

  /** @internal */
  get resolvedOptions(): ResolvedOptions {
    return this.#options;
  }

  get region(): string {
    return this.resolvedOptions.region;
  }

  #url(location: S3Location, query: string): { url: string; encodedPath: string; host: string } {
    const options = this.resolvedOptions;
    const key = uriEncode(location.key, true);
    // Bucket names with dots break TLS names of virtual hosts: those go path style.
    const pathStyle = options.forcePathStyle || location.bucket.includes('.');
    const base = options.endpoint ?? `https://s3.${options.region}.amazonaws.com`;
    const origin = new URL(base);
    if (!pathStyle) origin.hostname = `${location.bucket}.${origin.hostname}`;
    const encodedPath = pathStyle ? `${origin.pathname.replace(/\/+$/, '')}/${uriEncode(location.bucket, false)}/${key}` : `${origin.pathname.replace(/\/+$/, '')}/${key}`;
    return { url: `${origin.protocol}//${origin.host}${encodedPath}${query ? `?${query}` : ''}`, encodedPath, host: origin.host };
  }

  /** Sends a request, signed, retrying what a retry may cure; an answer the caller does not accept becomes a StorageError. */
  async #send(spec: RequestSpec): Promise<Response> {
    const options = this.resolvedOptions;
    const query = canonicalQuery(spec.query ?? []);
    const { url, encodedPath, host } = this.#url(spec.location, query);
    const payloadHash = spec.body ? sha256Hex(spec.body) : EMPTY_PAYLOAD_HASH;
    const display = spec.display ?? `s3://${spec.location.bucket}/${spec.location.key}`;
    let lastStatus: number | undefined;
    let lastCode: string | undefined;
    let lastError: unknown;
    let unsigned = false;
    for (let attempt = 1; attempt <= options.maxAttempts; attempt++) {
      if (attempt > 1) await sleep(backoffMs(attempt - 1));
      const credentials = await this.#credentials();
      const at = new Date();
      const headers: Record<string, string> = { ...spec.headers, host, 'x-amz-date': amzDate(at), 'x-amz-content-sha256': payloadHash };
      if (credentials?.sessionToken) headers['x-amz-security-token'] = credentials.sessionToken;
      if (credentials) {
        headers.authorization = signRequest({ method: spec.method, encodedPath, query, headers, payloadHash }, credentials, options.region, at).authorization;
      }
      unsigned = !credentials;
      const { host: _host, ...sent } = headers;
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), options.requestTimeoutMs);
      let response: Response;
      try {
        response = await fetch(url, { method: spec.method, headers: sent, body: spec.body, signal: controller.signal });
      } catch (error) {
        lastError = error;
        lastStatus = undefined;
        continue;
      } finally {
        clearTimeout(timer);
      }
      if (response.ok || spec.accept?.includes(response.status)) return response;
      const text = spec.method === 'HEAD' ? '' : await response.text().catch(() => '');
      lastStatus = response.status;
      lastCode = xmlValue(text, 'Code');
      const message = xmlValue(text, 'Message');
      if (RETRIED_STATUSES.has(response.status)) {
        lastError = new Error(message ?? `status ${response.status}`);
        continue;
      }
      throw new StorageError(
        response.status === 404 ? 'ERR_STORAGE_NOT_FOUND' : response.status === 403 ? 'ERR_STORAGE_ACCESS' : 'ERR_STORAGE_REQUEST',
        `S3 ${spec.method} ${display} failed: ${response.status}${lastCode ? ` ${lastCode}` : ''}${message ? `: ${message}` : ''}${response.status === 403 && unsigned ? ' (no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, give the process a role, or pass keys to S3FileSystem)' : ''}`,
        { url: display, status: response.status, ...(lastCode ? { storageCode: lastCode } : {}), attempts: attempt },
      );
    }
    const reason = lastStatus !== undefined ? `status ${lastStatus}${lastCode ? ` ${lastCode}` : ''}` : `no answer (${(lastError as Error)?.cause instanceof Error ? ((lastError as Error).cause as Error).message : (lastError as Error)?.message})`;
    throw new StorageError('ERR_STORAGE_UNAVAILABLE', `S3 ${spec.method} ${display} failed after ${options.maxAttempts} tries: ${reason}`, {
      url: display,
      ...(lastStatus !== undefined ? { status: lastStatus } : {}),
      ...(lastCode ? { storageCode: lastCode } : {}),
      attempts: options.maxAttempts,
      cause: lastError,
    });
  }

  async #sendText(spec: RequestSpec): Promise<string> {
    const response = await this.#send(spec);
    const text = await response.text();
    // CopyObject and CompleteMultipartUpload may answer 200 with an error in the body.
    if (text.includes('<Error>')) {
      const code = xmlValue(text, 'Code');
      throw new StorageError(code === 'InternalError' || code === 'SlowDown' ? 'ERR_STORAGE_UNAVAILABLE' : 'ERR_STORAGE_REQUEST', `S3 ${spec.method} s3://${spec.location.bucket}/${spec.location.key} failed: ${code ?? ''}: ${xmlValue(text, 'Message') ?? text.slice(0, 200)}`, {
        url: `s3://${spec.location.bucket}/${spec.location.key}`,
        status: response.status,
        ...(code ? { storageCode: code } : {}),
        attempts: 1,
      });
    }
    return text;
  }

  /** Objects under a prefix, page by page (at most `limit`). */
  async #list(bucket: string, prefix: string, limit = Number.POSITIVE_INFINITY): Promise<ListedFile[]> {
    const found: ListedFile[] = [];
    let token: string | undefined;
    do {
      const query: Array<[string, string]> = [['list-type', '2'], ['prefix', prefix]];
      if (token) query.push(['continuation-token', token]);
      if (Number.isFinite(limit)) query.push(['max-keys', String(limit)]);
      const xml = await this.#sendText({ method: 'GET', location: { bucket, key: '' }, query, display: `s3://${bucket}/${prefix}` });
      for (const match of xml.matchAll(/<Contents>([\s\S]*?)<\/Contents>/g)) {
        const key = xmlValue(match[1], 'Key');
        if (key === undefined || key.endsWith('/')) continue; // folder markers made by consoles
        found.push({ path: `s3://${bucket}/${key}`, bytes: Number(xmlValue(match[1], 'Size') ?? 0) });
      }
      token = xmlValue(xml, 'IsTruncated') === 'true' ? xmlValue(xml, 'NextContinuationToken') : undefined;
    } while (token && found.length < limit);
    return found;
  }

  async stat(path: string): Promise<{ kind: 'file'; bytes: number; modifiedMs?: number } | { kind: 'directory' } | { kind: 'missing' }> {
    const { bucket, key } = locate(path);
    if (key !== '' && !key.endsWith('/')) {
      const response = await this.#send({ method: 'HEAD', location: { bucket, key }, accept: [404] });
      if (response.status !== 404) {
        const modified = Date.parse(response.headers.get('last-modified') ?? '');
        return { kind: 'file', bytes: Number(response.headers.get('content-length') ?? 0), ...(Number.isNaN(modified) ? {} : { modifiedMs: modified }) };
      }
    }
    const prefix = key === '' || key.endsWith('/') ? key : `${key}/`;
    const below = await this.#list(bucket, prefix, 1);
    return below.length > 0 ? { kind: 'directory' } : { kind: 'missing' };
  }

  listFiles(directory: string): Promise<ListedFile[]> {
    const { bucket, key } = locate(directory);
    return this.#list(bucket, key === '' || key.endsWith('/') ? key : `${key}/`);
  }

  async open(path: string): Promise<RandomAccessFile> {
    const location = locate(path);
    const head = await this.#send({ method: 'HEAD', location, accept: [404] });
    if (head.status === 404) throw notFound(path);
    return new S3File(this, location, Number(head.headers.get('content-length') ?? 0));
  }

  /** @internal Bytes [start, end) of an object; a body that breaks off is asked for again. */
  async readRange(location: S3Location, start: number, end: number): Promise<Uint8Array> {
    return end <= start ? new Uint8Array(0) : collect(this.#body(location, start, end));
  }

  readStream(path: string, start = 0, end?: number): AsyncIterable<Uint8Array> {
    return end !== undefined && end <= start ? (async function* () {})() : this.#body(locate(path), start, end);
  }

  /**
   * An object's bytes from `start` (to `end`, or its end) as they arrive. A connection that drops
   * mid-body is resumed where it stopped, with the object's ETag as a precondition (an object
   * replaced meanwhile fails the read rather than splice two versions), up to maxAttempts times.
   */
  async *#body(location: S3Location, start: number, end?: number): AsyncGenerator<Uint8Array> {
    const options = this.resolvedOptions;
    let position = start;
    let etag: string | undefined;
    for (let broken = 0; ; ) {
      const headers: Record<string, string> = {};
      if (position > 0 || end !== undefined) headers.range = `bytes=${position}-${end === undefined ? '' : end - 1}`;
      if (etag) headers['if-match'] = etag;
      // A start at or past the end is answered 416: there is nothing to read.
      const response = await this.#send({ method: 'GET', location, headers, accept: [416] });
      if (response.status === 416 || !response.body) return;
      etag ??= response.headers.get('etag') ?? undefined;
      try {
        for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
          position += chunk.byteLength;
          yield chunk;
        }
        return;
      } catch (error) {
        if (++broken >= options.maxAttempts) {
          throw new StorageError('ERR_STORAGE_UNAVAILABLE', `S3 GET s3://${location.bucket}/${location.key} broke off ${broken} times, last at byte ${position}: ${(error as Error).message}`, {
            url: `s3://${location.bucket}/${location.key}`,
            attempts: broken,
            cause: error,
          });
        }
        await sleep(backoffMs(broken));
      }
    }
  }

  /** A Blob-shaped view of an object: each slice read is one ranged GET. */
  async openBlob(path: string): Promise<BlobLike> {
    const file = (await this.open(path)) as S3File;
    const size = file.size;
    const view = (from: number, to: number): BlobLike & { arrayBuffer(): Promise<ArrayBuffer> } => ({
      size: to - from,
      slice: (start = 0, end = to - from) => view(from + Math.max(0, start), Math.min(to, from + end)),
      arrayBuffer: async () => {
        const bytes = await this.readRange(file.location, from, to);
        return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer;
      },
    });
    return view(0, size);
  }

  async create(path: string): Promise<WritableFile & { abort(): Promise<void> }> {
    const location = locate(path);
    if (location.key === '' || location.key.endsWith('/')) throw new InvalidArgumentError(`'${path}' names a prefix, not an object to write`, 'ERR_DATA_PATH');
    return new S3Upload(this, location, this.resolvedOptions);
  }

  /** @internal */
  request(spec: RequestSpec): Promise<Response> {
    return this.#send(spec);
  }

  /** @internal */
  requestText(spec: RequestSpec): Promise<string> {
    return this.#sendText(spec);
  }

  readFile(path: string): Promise<Uint8Array> {
    return collect(this.#body(locate(path), 0));
  }

  async writeFileDurably(path: string, bytes: Uint8Array): Promise<void> {
    // One PUT: the object appears whole when it is stored, and is durable then.
    const response = await this.#send({ method: 'PUT', location: locate(path), body: bytes });
    await response.arrayBuffer();
  }

  async createExclusive(path: string, bytes: Uint8Array): Promise<boolean> {
    // A conditional write: of two racing writers, the store lets one through and answers 412 to the other.
    const response = await this.#send({ method: 'PUT', location: locate(path), body: bytes, headers: { 'if-none-match': '*' }, accept: [409, 412] });
    await response.arrayBuffer();
    return response.status !== 412 && response.status !== 409;
  }

  async touch(path: string): Promise<void> {
    // Copied onto itself with its metadata replaced: the same bytes, a new Last-Modified.
    const location = locate(path);
    await this.#sendText({ method: 'PUT', location, headers: { 'x-amz-copy-source': `/${location.bucket}/${uriEncode(location.key, true)}`, 'x-amz-metadata-directive': 'REPLACE' } });
  }

  async rename(from: string, to: string): Promise<void> {
    const source = locate(from);
    const target = locate(to);
    const copySource = `/${source.bucket}/${uriEncode(source.key, true)}`;
    const head = await this.#send({ method: 'HEAD', location: source, accept: [404] });
    if (head.status === 404) throw notFound(from);
    const size = Number(head.headers.get('content-length') ?? 0);
    if (size <= MAX_COPY_BYTES) {
      await this.#sendText({ method: 'PUT', location: target, headers: { 'x-amz-copy-source': copySource } });
    } else {
      const upload = xmlValue(await this.#sendText({ method: 'POST', location: target, query: [['uploads', '']] }), 'UploadId')!;
      try {
        const tags: string[] = [];
        for (let start = 0, part = 1; start < size; start += COPY_PART_BYTES, part++) {
          const answer = await this.#sendText({
            method: 'PUT',
            location: target,
            query: [['partNumber', String(part)], ['uploadId', upload]],
            headers: { 'x-amz-copy-source': copySource, 'x-amz-copy-source-range': `bytes=${start}-${Math.min(size, start + COPY_PART_BYTES) - 1}` },
          });
          tags.push(xmlValue(answer, 'ETag')!);
        }
        await completeUpload(this, target, upload, tags);
      } catch (error) {
        await this.#send({ method: 'DELETE', location: target, query: [['uploadId', upload]] }).catch(() => undefined);
        throw error;
      }
    }
    await this.#send({ method: 'DELETE', location: source });
  }

  async remove(path: string): Promise<void> {
    const { bucket, key } = locate(path);
    // The object of that name, if any, and everything below it as a prefix.
    const prefix = key === '' || key.endsWith('/') ? key : `${key}/`;
    const doomed = [...(key === '' ? [] : [key]), ...(await this.#list(bucket, prefix)).map((file) => locate(file.path).key)];
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < doomed.length) await this.#send({ method: 'DELETE', location: { bucket, key: doomed[next++] }, accept: [404] });
    };
    await Promise.all(Array.from({ length: Math.min(DELETES_IN_FLIGHT, doomed.length) }, worker));
  }

  async makeDirectory(): Promise<void> {
    // Object storage has no directories: a prefix exists while an object is below it.
  }
}

async function completeUpload(storage: S3FileSystem, location: S3Location, upload: string, tags: readonly string[]): Promise<void> {
  const body = `<CompleteMultipartUpload>${tags.map((tag, index) => `<Part><PartNumber>${index + 1}</PartNumber><ETag>${escapeXml(tag)}</ETag></Part>`).join('')}</CompleteMultipartUpload>`;
  await storage.requestText({ method: 'POST', location, query: [['uploadId', upload]], body: Buffer.from(body), headers: { 'content-type': 'application/xml' } });
}

/** An object open for reads: ranged GETs through one read-ahead window. */
class S3File implements RandomAccessFile {
  readonly fd = -1;
  #window: { start: number; bytes: Uint8Array } | undefined;

  constructor(
    private readonly storage: S3FileSystem,
    readonly location: S3Location,
    readonly size: number,
  ) {}

  async stat(): Promise<{ size: number }> {
    return { size: this.size };
  }

  async read<T extends Uint8Array>(buffer: T, offset: number, length: number, position: number): Promise<{ bytesRead: number; buffer: T }> {
    const end = Math.min(this.size, position + length);
    if (end <= position) return { bytesRead: 0, buffer };
    let window = this.#window;
    if (!window || position < window.start || end > window.start + window.bytes.byteLength) {
      let from = position;
      const to = Math.min(this.size, position + Math.max(length, READ_AHEAD_BYTES));
      if (to === this.size) from = Math.max(0, Math.min(position, this.size - TAIL_WINDOW_BYTES));
      window = { start: from, bytes: await this.storage.readRange(this.location, from, to) };
      this.#window = window;
    }
    const bytesRead = Math.min(end, window.start + window.bytes.byteLength) - position;
    buffer.set(window.bytes.subarray(position - window.start, position - window.start + bytesRead), offset);
    return { bytesRead, buffer };
  }

  async close(): Promise<void> {
    this.#window = undefined;
  }
}

/**
 * An object being written: bytes gather into parts; a file smaller than a part is one PUT at
 * close, a larger one a multipart upload whose parts go up as they fill (a few at once) and which
 * only becomes the object when completed. abort() (or a failure) cancels the upload.
 */
class S3Upload implements WritableFile {
  #pending: Uint8Array[] = [];
  #pendingBytes = 0;
  #upload: Promise<string> | undefined;
  #tags: string[] = [];
  #inFlight = new Set<Promise<void>>();
  #failure: unknown;
  #done = false;

  constructor(
    private readonly storage: S3FileSystem,
    private readonly location: S3Location,
    private readonly options: ResolvedOptions,
  ) {}

  async write(data: string | Uint8Array): Promise<void> {
    if (this.#done) throw new InvalidArgumentError(`write to s3://${this.location.bucket}/${this.location.key} after it was closed`, 'ERR_STORAGE_REQUEST');
    if (this.#failure) throw this.#failure;
    const bytes = typeof data === 'string' ? Buffer.from(data) : data;
    if (bytes.byteLength === 0) return;
    // The caller may reuse its buffer once this returns.
    this.#pending.push(typeof data === 'string' ? bytes : Uint8Array.prototype.slice.call(bytes));
    this.#pendingBytes += bytes.byteLength;
    while (this.#pendingBytes >= this.options.partBytes) {
      await this.#sendPart(this.#take(this.options.partBytes));
      if (this.#failure) throw this.#failure;
    }
  }

  /** The first `bytes` of what is pending, as one buffer. */
  #take(bytes: number): Buffer {
    // One pending piece (a large write, or what is left of one) is cut, not copied again.
    const whole = this.#pending.length === 1 ? Buffer.from(this.#pending[0].buffer, this.#pending[0].byteOffset, this.#pending[0].byteLength) : Buffer.concat(this.#pending, this.#pendingBytes);
    this.#pending = whole.byteLength > bytes ? [whole.subarray(bytes)] : [];
    this.#pendingBytes = whole.byteLength - Math.min(bytes, whole.byteLength);
    return whole.subarray(0, bytes);
  }

  async #sendPart(part: Buffer): Promise<void> {
    this.#upload ??= this.storage
      .requestText({ method: 'POST', location: this.location, query: [['uploads', '']] })
      .then((xml) => {
        const id = xmlValue(xml, 'UploadId');
        if (!id) throw new StorageError('ERR_STORAGE_REQUEST', `S3 did not start a multipart upload of s3://${this.location.bucket}/${this.location.key}`, { url: `s3://${this.location.bucket}/${this.location.key}`, attempts: 1 });
        return id;
      });
    const number = this.#tags.length + 1;
    this.#tags.push('');
    const sending = (async () => {
      const upload = await this.#upload!;
      const response = await this.storage.request({ method: 'PUT', location: this.location, query: [['partNumber', String(number)], ['uploadId', upload]], body: part });
      await response.arrayBuffer();
      this.#tags[number - 1] = response.headers.get('etag') ?? '';
    })().catch((error: unknown) => {
      this.#failure ??= error;
    });
    this.#inFlight.add(sending);
    void sending.finally(() => this.#inFlight.delete(sending));
    while (this.#inFlight.size >= this.options.partsInFlight) await Promise.race(this.#inFlight);
  }

  async sync(): Promise<void> {
    // Durable once the upload completes: nothing to force before.
  }

  async close(): Promise<void> {
    if (this.#done) return;
    this.#done = true;
    try {
      if (!this.#upload) {
        const body = this.#take(this.#pendingBytes);
        const response = await this.storage.request({ method: 'PUT', location: this.location, body });
        await response.arrayBuffer();
        return;
      }
      if (this.#pendingBytes > 0) await this.#sendPart(this.#take(this.#pendingBytes));
      await Promise.all(this.#inFlight);
      if (this.#failure) throw this.#failure;
      await completeUpload(this.storage, this.location, await this.#upload, this.#tags);
    } catch (error) {
      await this.#cancel();
      throw error;
    }
  }

  async abort(): Promise<void> {
    this.#done = true;
    this.#pending = [];
    this.#pendingBytes = 0;
    await Promise.all(this.#inFlight);
    await this.#cancel();
  }

  async #cancel(): Promise<void> {
    const upload = await this.#upload?.catch(() => undefined);
    if (upload) await this.storage.request({ method: 'DELETE', location: this.location, query: [['uploadId', upload]], accept: [404] }).catch(() => undefined);
  }
}

registerFileSystem('s3', (options) => new S3FileSystem((options ?? {}) as S3FileSystemOptions));

// Read and write tasks carry the driver's filesystem: a worker on another host uses the same
// endpoint and credentials without its own environment.
registerPortableClass(
  S3FileSystem,
  'trellis:data/s3-filesystem',
  (storage) => storage.portableOptions(),
  (options: ResolvedOptions) => S3FileSystem.fromResolved(options),
);
