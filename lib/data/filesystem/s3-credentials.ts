/**
 * Where S3 credentials come from when neither the options nor the environment's keys nor the
 * shared credentials file give them: the providers a workload on AWS has, each asked over HTTP
 * and each handing out temporary credentials that expire. In the order AWS's SDKs ask them: a web
 * identity token exchanged at STS (EKS service accounts, IRSA), the container credentials endpoint
 * (ECS tasks, EKS Pod Identity), and the instance metadata service (IMDSv2, EC2 instance profiles).
 */
import { readFileSync } from 'node:fs';
import { StorageError } from '../../errors.js';
import type { Credentials } from './s3-signing.js';
import { xmlValue } from './s3-xml.js';

/** Credentials with the time they stop working (ms since the epoch), if they do. */
export interface ExpiringCredentials extends Credentials {
  expiration?: number;
}

/** How long an instance metadata request may take: off EC2 nothing answers, and that must be quick. */
const METADATA_TIMEOUT_MS = 1_000;
const PROVIDER_TIMEOUT_MS = 10_000;


function expirationOf(text: string | undefined): number | undefined {
  if (!text) return undefined;
  const at = Date.parse(text);
  return Number.isNaN(at) ? undefined : at;
}

async function request(url: string, init: RequestInit, timeoutMs: number): Promise<Response> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    return await fetch(url, { ...init, signal: controller.signal });
  } finally {
    clearTimeout(timer);
  }
}

const failed = (provider: string, detail: string, cause?: unknown): StorageError =>
  new StorageError('ERR_STORAGE_ACCESS', `S3 credentials from ${provider} could not be had: ${detail}`, { url: provider, attempts: 1, ...(cause ? { cause } : {}) });

/** A web identity token (AWS_WEB_IDENTITY_TOKEN_FILE) exchanged for a role's credentials (AWS_ROLE_ARN) at STS. */
async function fromWebIdentity(environment: NodeJS.ProcessEnv, region: string): Promise<ExpiringCredentials | undefined> {
  const tokenFile = environment.AWS_WEB_IDENTITY_TOKEN_FILE;
  const role = environment.AWS_ROLE_ARN;
  if (!tokenFile || !role) return undefined;
  let token: string;
  try {
    token = readFileSync(tokenFile, 'utf8').trim();
  } catch (error) {
    throw failed('a web identity token', `AWS_WEB_IDENTITY_TOKEN_FILE '${tokenFile}' cannot be read (${(error as Error).message})`, error);
  }
  const endpoint = (environment.AWS_ENDPOINT_URL_STS ?? `https://sts.${region}.amazonaws.com`).replace(/\/+$/, '');
  const body = new URLSearchParams({
    Action: 'AssumeRoleWithWebIdentity',
    Version: '2011-06-15',
    RoleArn: role,
    RoleSessionName: environment.AWS_ROLE_SESSION_NAME ?? `trellis-${process.pid}`,
    WebIdentityToken: token,
  });
  let answer: Response;
  try {
    answer = await request(`${endpoint}/`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: body.toString() }, PROVIDER_TIMEOUT_MS);
  } catch (error) {
    throw failed(`STS (${endpoint})`, `no answer (${(error as Error).message})`, error);
  }
  const xml = await answer.text();
  if (!answer.ok) throw failed(`STS (${endpoint})`, `AssumeRoleWithWebIdentity for ${role} answered ${answer.status}${xmlValue(xml, 'Code') ? ` ${xmlValue(xml, 'Code')}` : ''}: ${xmlValue(xml, 'Message') ?? xml.slice(0, 200)}`);
  const accessKeyId = xmlValue(xml, 'AccessKeyId');
  const secretAccessKey = xmlValue(xml, 'SecretAccessKey');
  if (!accessKeyId || !secretAccessKey) throw failed(`STS (${endpoint})`, 'its answer holds no credentials');
  const sessionToken = xmlValue(xml, 'SessionToken');
  const expiration = expirationOf(xmlValue(xml, 'Expiration'));
  return { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}), ...(expiration !== undefined ? { expiration } : {}) };
}

/** The JSON shape the container endpoint and the instance metadata service answer with. */
function fromJson(text: string, provider: string): ExpiringCredentials {
  let parsed: { AccessKeyId?: string; SecretAccessKey?: string; Token?: string; Expiration?: string };
  try {
    parsed = JSON.parse(text) as typeof parsed;
  } catch {
    throw failed(provider, `its answer is not JSON: ${text.slice(0, 200)}`);
  }
  if (!parsed.AccessKeyId || !parsed.SecretAccessKey) throw failed(provider, 'its answer holds no credentials');
  const expiration = expirationOf(parsed.Expiration);
  return { accessKeyId: parsed.AccessKeyId, secretAccessKey: parsed.SecretAccessKey, ...(parsed.Token ? { sessionToken: parsed.Token } : {}), ...(expiration !== undefined ? { expiration } : {}) };
}

/** The container credentials endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI or _RELATIVE_URI). */
async function fromContainer(environment: NodeJS.ProcessEnv): Promise<ExpiringCredentials | undefined> {
  const url = environment.AWS_CONTAINER_CREDENTIALS_FULL_URI ?? (environment.AWS_CONTAINER_CREDENTIALS_RELATIVE_URI ? `http://169.254.170.2${environment.AWS_CONTAINER_CREDENTIALS_RELATIVE_URI}` : undefined);
  if (!url) return undefined;
  let authorization = environment.AWS_CONTAINER_AUTHORIZATION_TOKEN;
  if (environment.AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE) {
    try {
      authorization = readFileSync(environment.AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, 'utf8').trim();
    } catch (error) {
      throw failed('the container endpoint', `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE cannot be read (${(error as Error).message})`, error);
    }
  }
  let answer: Response;
  try {
    answer = await request(url, { headers: authorization ? { authorization } : {} }, PROVIDER_TIMEOUT_MS);
  } catch (error) {
    throw failed(`the container endpoint (${url})`, `no answer (${(error as Error).message})`, error);
  }
  const text = await answer.text();
  if (!answer.ok) throw failed(`the container endpoint (${url})`, `answered ${answer.status}: ${text.slice(0, 200)}`);
  return fromJson(text, `the container endpoint (${url})`);
}

/** The instance's role through IMDSv2 (a session token first); off EC2 nothing answers and this gives nothing. */
async function fromInstanceMetadata(environment: NodeJS.ProcessEnv): Promise<ExpiringCredentials | undefined> {
  if ((environment.AWS_EC2_METADATA_DISABLED ?? '').toLowerCase() === 'true') return undefined;
  const endpoint = (environment.AWS_EC2_METADATA_SERVICE_ENDPOINT ?? 'http://169.254.169.254').replace(/\/+$/, '');
  let token: string;
  try {
    const answer = await request(`${endpoint}/latest/api/token`, { method: 'PUT', headers: { 'x-aws-ec2-metadata-token-ttl-seconds': '21600' } }, METADATA_TIMEOUT_MS);
    if (!answer.ok) return undefined;
    token = await answer.text();
  } catch {
    // Not on EC2 (or its metadata service is off): this provider has nothing.
    return undefined;
  }
  const headers = { 'x-aws-ec2-metadata-token': token };
  const base = `${endpoint}/latest/meta-data/iam/security-credentials/`;
  const roles = await request(base, { headers }, METADATA_TIMEOUT_MS).catch(() => undefined);
  // An instance without a profile answers 404: nothing to have.
  if (!roles?.ok) return undefined;
  const role = (await roles.text()).split('\n')[0].trim();
  if (!role) return undefined;
  const answer = await request(`${base}${role}`, { headers }, METADATA_TIMEOUT_MS).catch((error: unknown) => {
    throw failed('the instance metadata service', `role ${role}: no answer (${(error as Error).message})`, error);
  });
  const text = await answer.text();
  if (!answer.ok) throw failed('the instance metadata service', `role ${role} answered ${answer.status}: ${text.slice(0, 200)}`);
  return fromJson(text, 'the instance metadata service');
}

/**
 * The first provider of the chain that has credentials, with its name, or undefined when none
 * does (requests then go unsigned). A provider that is configured but fails (a token file that
 * cannot be read, STS refusing the role) is an error, not a reason to go on unsigned.
 */
export async function credentialsFromProviders(region: string, environment: NodeJS.ProcessEnv = process.env): Promise<{ credentials: ExpiringCredentials; provider: string } | undefined> {
  const webIdentity = await fromWebIdentity(environment, region);
  if (webIdentity) return { credentials: webIdentity, provider: 'web identity' };
  const container = await fromContainer(environment);
  if (container) return { credentials: container, provider: 'container endpoint' };
  const instance = await fromInstanceMetadata(environment);
  if (instance) return { credentials: instance, provider: 'instance metadata' };
  return undefined;
}
