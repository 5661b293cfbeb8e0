/**
 * AWS Signature Version 4 for S3 requests (the header form). Kept apart from the client so that
 * a test can pin it to AWS's published example and a test server can check each request it
 * receives against what it should have been signed as.
 */
import { createHash, createHmac } from 'node:crypto';

export interface Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

/** The hash S3 takes for a request without a body. */
export const EMPTY_PAYLOAD_HASH = createHash('sha256').update('').digest('hex');

export const sha256Hex = (data: string | Uint8Array): string => createHash('sha256').update(data).digest('hex');

/**
 * RFC 3986 encoding as SigV4 wants it: every byte but the unreserved characters escaped, '/'
 * kept in paths (S3 object keys are not encoded twice).
 */
export function uriEncode(text: string, keepSlash: boolean): string {
  const encoded = encodeURIComponent(text).replace(/[!'()*]/g, (character) => `%${character.charCodeAt(0).toString(16).toUpperCase()}`);
  return keepSlash ? encoded.replace(/%2F/g, '/') : encoded;
}

/** `name=value&...` sorted by name, both encoded: the canonical query and the one sent. */
export function canonicalQuery(query: ReadonlyArray<readonly [string, string]>): string {
  return query
    .map(([name, value]) => [uriEncode(name, false), uriEncode(value, false)] as const)
    .sort(([a, aValue], [b, bValue]) => (a < b ? -1 : a > b ? 1 : aValue < bValue ? -1 : aValue > bValue ? 1 : 0))
    .map(([name, value]) => `${name}=${value}`)
    .join('&');
}

export interface RequestToSign {
  method: string;
  /** The path as sent: already encoded. */
  encodedPath: string;
  /** The query as sent (canonicalQuery's form). */
  query: string;
  /** Header names in any case; `host` among them. */
  headers: Record<string, string>;
  payloadHash: string;
}

/** The request in SigV4's canonical form, and the headers it signs (lower case, sorted). */
export function canonicalRequest(request: RequestToSign, signed?: readonly string[]): { text: string; signedHeaders: string } {
  const headers = new Map<string, string>();
  for (const [name, value] of Object.entries(request.headers)) headers.set(name.toLowerCase(), value.trim().replace(/\s+/g, ' '));
  const names = (signed ?? [...headers.keys()]).slice().sort();
  const signedHeaders = names.join(';');
  const text = [
    request.method,
    request.encodedPath,
    request.query,
    names.map((name) => `${name}:${headers.get(name) ?? ''}\n`).join(''),
    signedHeaders,
    request.payloadHash,
  ].join('\n');
  return { text, signedHeaders };
}

/** The signing key of a day, region and service (HMAC chain from the secret). */
function signingKey(secret: string, day: string, region: string, service: string): Buffer {
  const date = createHmac('sha256', `AWS4${secret}`).update(day).digest();
  const inRegion = createHmac('sha256', date).update(region).digest();
  const inService = createHmac('sha256', inRegion).update(service).digest();
  return createHmac('sha256', inService).update('aws4_request').digest();
}

/** SigV4's timestamp form: 20130524T000000Z. */
export const amzDate = (at: Date): string => at.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '');

/**
 * The signature of a request and the Authorization header carrying it. `at` must be the time in
 * the request's x-amz-date header.
 */
export function signRequest(
  request: RequestToSign,
  credentials: Credentials,
  region: string,
  at: Date,
  service = 's3',
  signed?: readonly string[],
): { signature: string; authorization: string } {
  const stamp = amzDate(at);
  const day = stamp.slice(0, 8);
  const scope = `${day}/${region}/${service}/aws4_request`;
  const { text, signedHeaders } = canonicalRequest(request, signed);
  const stringToSign = ['AWS4-HMAC-SHA256', stamp, scope, sha256Hex(text)].join('\n');
  const signature = createHmac('sha256', signingKey(credentials.secretAccessKey, day, region, service)).update(stringToSign).digest('hex');
  return {
    signature,
    authorization: `AWS4-HMAC-SHA256 Credential=${credentials.accessKeyId}/${scope}, SignedHeaders=${signedHeaders}, Signature=${signature}`,
  };
}
