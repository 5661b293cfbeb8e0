/**
 * Where S3 credentials come from when neither the options nor the environment's keys nor the
 * profile's keys give them: the providers that hand out temporary credentials that expire. In the
 * order AWS's SDKs ask them: the profile's role (`role_arn`, assumed at STS with its source
 * profile's credentials), its IAM Identity Center (SSO) role, from the token `aws sso login`
 * cached, or its `credential_process` command; a web identity token exchanged at STS (EKS
 * service accounts, IRSA); the container credentials endpoint (ECS tasks, EKS Pod Identity); and
 * the instance metadata service (IMDSv2, EC2 instance profiles). Also here: the shared credentials
 * and config files (INI) that name profiles.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { StorageError } from '../../errors.js';
import { amzDate, sha256Hex, signRequest, type Credentials } from './s3-signing.js';
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
  return stsCredentials(answer, endpoint, 'AssumeRoleWithWebIdentity', role);
}

/** The credentials in STS's XML answer to an AssumeRole action, or the error it answered. */
async function stsCredentials(answer: Response, endpoint: string, action: string, role: string): Promise<ExpiringCredentials> {
  const xml = await answer.text();
  if (!answer.ok) throw failed(`STS (${endpoint})`, `${action} for ${role} answered ${answer.status}${xmlValue(xml, 'Code') ? ` ${xmlValue(xml, 'Code')}` : ''}: ${xmlValue(xml, 'Message') ?? xml.slice(0, 200)}`);
  const accessKeyId = xmlValue(xml, 'AccessKeyId');
  const secretAccessKey = xmlValue(xml, 'SecretAccessKey');
  if (!accessKeyId || !secretAccessKey) throw failed(`STS (${endpoint})`, 'its answer holds no credentials');
  const sessionToken = xmlValue(xml, 'SessionToken');
  const expiration = expirationOf(xmlValue(xml, 'Expiration'));
  return { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}), ...(expiration !== undefined ? { expiration } : {}) };
}

/** `~` as AWS's tools read it: HOME where it is set. */
const homeOf = (environment: NodeJS.ProcessEnv): string => environment.HOME || homedir();

/** Sections of an INI file (AWS's shared credentials and config files), keys lower-cased; empty when it cannot be read. */
export function readIni(file: string): Map<string, Record<string, string>> {
  const sections = new Map<string, Record<string, string>>();
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return sections;
  }
  let section: Record<string, string> | undefined;
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[\s*(.+?)\s*\]$/.exec(line);
    if (header) {
      const name = header[1].replace(/\s+/g, ' ');
      section = sections.get(name) ?? {};
      sections.set(name, section);
      continue;
    }
    const cut = line.indexOf('=');
    if (section && cut > 0) section[line.slice(0, cut).trim().toLowerCase()] = line.slice(cut + 1).trim();
  }
  return sections;
}

/**
 * A profile's settings: the config file's `[profile NAME]` (`[default]` for the default one)
 * under the credentials file's `[NAME]`, which wins where both say something; and the config
 * file's sections, for the `[sso-session ...]` a profile may name.
 */
export function profileSettings(profile: string, environment: NodeJS.ProcessEnv = process.env): { settings: Record<string, string>; config: Map<string, Record<string, string>> } {
  const config = readIni(environment.AWS_CONFIG_FILE ?? join(homeOf(environment), '.aws', 'config'));
  const credentials = readIni(environment.AWS_SHARED_CREDENTIALS_FILE ?? join(homeOf(environment), '.aws', 'credentials'));
  const fromConfig = config.get(profile === 'default' ? 'default' : `profile ${profile}`) ?? (profile === 'default' ? config.get('profile default') : undefined);
  return { settings: { ...fromConfig, ...credentials.get(profile) }, config };
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
 * The profile's `credential_process`: a command that prints credentials as JSON (`Version` 1,
 * `AccessKeyId`, `SecretAccessKey`, `SessionToken`, `Expiration`), as AWS's SDKs run it.
 */
async function fromProcess(command: string, profile: string): Promise<ExpiringCredentials> {
  const provider = `credential_process of profile '${profile}'`;
  const stdout = await new Promise<string>((resolve, reject) => {
    execFile('/bin/sh', ['-c', command], { timeout: 60_000, maxBuffer: 1 << 20, encoding: 'utf8' }, (error, out, stderr) => {
      if (error) reject(failed(provider, `\`${command}\` failed (${error.code ?? error.message}): ${String(stderr).trim().slice(0, 300)}`, error));
      else resolve(out);
    });
  });
  let parsed: { Version?: number; AccessKeyId?: string; SecretAccessKey?: string; SessionToken?: string; Expiration?: string };
  try {
    parsed = JSON.parse(stdout) as typeof parsed;
  } catch {
    throw failed(provider, `\`${command}\` printed something other than JSON: ${stdout.slice(0, 200)}`);
  }
  if (parsed.Version !== 1) throw failed(provider, `its JSON has Version ${JSON.stringify(parsed.Version)}; version 1 is the one AWS defines`);
  if (!parsed.AccessKeyId || !parsed.SecretAccessKey) throw failed(provider, 'its JSON holds no AccessKeyId and SecretAccessKey');
  const expiration = expirationOf(parsed.Expiration);
  return {
    accessKeyId: parsed.AccessKeyId,
    secretAccessKey: parsed.SecretAccessKey,
    ...(parsed.SessionToken ? { sessionToken: parsed.SessionToken } : {}),
    ...(expiration !== undefined ? { expiration } : {}),
  };
}

/**
 * The profile's IAM Identity Center (SSO) role: the access token `aws sso login` cached (in
 * ~/.aws/sso/cache, named by the SHA-1 of the session's name, or of the start URL for a profile of
 * the older form) exchanged at the SSO portal for the role's credentials.
 */
async function fromSso(settings: Record<string, string>, config: Map<string, Record<string, string>>, profile: string, environment: NodeJS.ProcessEnv): Promise<ExpiringCredentials> {
  const provider = `SSO for profile '${profile}'`;
  let startUrl = settings.sso_start_url;
  let region = settings.sso_region;
  let cacheKey = startUrl;
  if (settings.sso_session) {
    const session = config.get(`sso-session ${settings.sso_session}`);
    if (!session) throw failed(provider, `the config file has no [sso-session ${settings.sso_session}] section`);
    startUrl = session.sso_start_url;
    region = session.sso_region ?? region;
    cacheKey = settings.sso_session;
  }
  const missing = [['sso_start_url', startUrl], ['sso_region', region], ['sso_account_id', settings.sso_account_id], ['sso_role_name', settings.sso_role_name]].filter(([, value]) => !value).map(([name]) => name);
  if (missing.length > 0) throw failed(provider, `the profile lacks ${missing.join(', ')}`);
  const cacheFile = join(homeOf(environment), '.aws', 'sso', 'cache', `${createHash('sha1').update(cacheKey!).digest('hex')}.json`);
  let token: { accessToken?: string; expiresAt?: string };
  try {
    token = JSON.parse(readFileSync(cacheFile, 'utf8')) as typeof token;
  } catch {
    throw failed(provider, `no cached login (${cacheFile}); run \`aws sso login --profile ${profile}\``);
  }
  const expiresAt = expirationOf(token.expiresAt);
  if (!token.accessToken || (expiresAt !== undefined && expiresAt <= Date.now())) {
    throw failed(provider, `the cached login ${expiresAt !== undefined ? `expired at ${new Date(expiresAt).toISOString()}` : 'holds no access token'}; run \`aws sso login --profile ${profile}\``);
  }
  const endpoint = (environment.AWS_ENDPOINT_URL_SSO ?? `https://portal.sso.${region}.amazonaws.com`).replace(/\/+$/, '');
  const url = `${endpoint}/federation/credentials?role_name=${encodeURIComponent(settings.sso_role_name)}&account_id=${encodeURIComponent(settings.sso_account_id)}`;
  let answer: Response;
  try {
    answer = await request(url, { headers: { 'x-amz-sso_bearer_token': token.accessToken } }, PROVIDER_TIMEOUT_MS);
  } catch (error) {
    throw failed(provider, `the SSO portal (${endpoint}) did not answer (${(error as Error).message})`, error);
  }
  const text = await answer.text();
  if (!answer.ok) throw failed(provider, `the SSO portal answered ${answer.status}: ${text.slice(0, 200)}`);
  let role: { roleCredentials?: { accessKeyId?: string; secretAccessKey?: string; sessionToken?: string; expiration?: number } };
  try {
    role = JSON.parse(text) as typeof role;
  } catch {
    throw failed(provider, `the SSO portal's answer is not JSON: ${text.slice(0, 200)}`);
  }
  const keys = role.roleCredentials;
  if (!keys?.accessKeyId || !keys.secretAccessKey) throw failed(provider, "the SSO portal's answer holds no credentials");
  return {
    accessKeyId: keys.accessKeyId,
    secretAccessKey: keys.secretAccessKey,
    ...(keys.sessionToken ? { sessionToken: keys.sessionToken } : {}),
    ...(typeof keys.expiration === 'number' ? { expiration: keys.expiration } : {}),
  };
}

/**
 * A profile's `role_arn` assumed at STS (AssumeRole, signed with SigV4) with the credentials of
 * its `source_profile` (which may itself be keys, SSO, a process or another role) or of its
 * `credential_source` (Environment, Ec2InstanceMetadata, EcsContainer).
 */
async function fromAssumeRole(settings: Record<string, string>, profile: string, environment: NodeJS.ProcessEnv, region: string, depth: number): Promise<ExpiringCredentials> {
  const role = settings.role_arn;
  const provider = `role ${role} for profile '${profile}'`;
  if (settings.mfa_serial) throw failed(provider, 'the profile asks for an MFA code (mfa_serial), which a job cannot type; give it credentials that need none');
  let source: Credentials | undefined;
  if (settings.source_profile) {
    if (depth >= 4) throw failed(provider, 'source_profile chains more than four roles deep (a cycle?)');
    source = settings.source_profile === profile ? staticCredentials(settings) : await profileCredentials(settings.source_profile, environment, region, depth + 1);
    if (!source) throw failed(provider, `its source_profile '${settings.source_profile}' has no credentials`);
  } else if (settings.credential_source === 'Environment') {
    if (!environment.AWS_ACCESS_KEY_ID || !environment.AWS_SECRET_ACCESS_KEY) throw failed(provider, 'credential_source Environment, but AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set');
    source = { accessKeyId: environment.AWS_ACCESS_KEY_ID, secretAccessKey: environment.AWS_SECRET_ACCESS_KEY, ...(environment.AWS_SESSION_TOKEN ? { sessionToken: environment.AWS_SESSION_TOKEN } : {}) };
  } else if (settings.credential_source === 'Ec2InstanceMetadata') {
    source = await fromInstanceMetadata(environment);
  } else if (settings.credential_source === 'EcsContainer') {
    source = await fromContainer(environment);
  } else {
    throw failed(provider, settings.credential_source ? `credential_source '${settings.credential_source}' is not Environment, Ec2InstanceMetadata or EcsContainer` : 'the profile names role_arn without source_profile or credential_source');
  }
  if (!source) throw failed(provider, `credential_source ${settings.credential_source} gave no credentials`);
  const stsRegion = settings.region ?? region;
  const endpoint = (environment.AWS_ENDPOINT_URL_STS ?? `https://sts.${stsRegion}.amazonaws.com`).replace(/\/+$/, '');
  const body = new URLSearchParams({
    Action: 'AssumeRole',
    Version: '2011-06-15',
    RoleArn: role,
    RoleSessionName: settings.role_session_name ?? `trellis-${process.pid}`,
    ...(settings.external_id ? { ExternalId: settings.external_id } : {}),
    ...(settings.duration_seconds ? { DurationSeconds: settings.duration_seconds } : {}),
  }).toString();
  const url = new URL(`${endpoint}/`);
  const at = new Date();
  const headers: Record<string, string> = { host: url.host, 'content-type': 'application/x-www-form-urlencoded; charset=utf-8', 'x-amz-date': amzDate(at) };
  if (source.sessionToken) headers['x-amz-security-token'] = source.sessionToken;
  headers.authorization = signRequest({ method: 'POST', encodedPath: url.pathname, query: '', headers, payloadHash: sha256Hex(body) }, source, stsRegion, at, 'sts').authorization;
  const { host: _host, ...sent } = headers;
  let answer: Response;
  try {
    answer = await request(url.toString(), { method: 'POST', headers: sent, body }, PROVIDER_TIMEOUT_MS);
  } catch (error) {
    throw failed(`STS (${endpoint})`, `no answer (${(error as Error).message})`, error);
  }
  return stsCredentials(answer, endpoint, 'AssumeRole', role);
}

function staticCredentials(settings: Record<string, string>): Credentials | undefined {
  if (!settings.aws_access_key_id || !settings.aws_secret_access_key) return undefined;
  return { accessKeyId: settings.aws_access_key_id, secretAccessKey: settings.aws_secret_access_key, ...(settings.aws_session_token ? { sessionToken: settings.aws_session_token } : {}) };
}

/** What a named profile gives, as a source for a role: a role of its own, its keys, its SSO role or its process. */
async function profileCredentials(profile: string, environment: NodeJS.ProcessEnv, region: string, depth: number): Promise<ExpiringCredentials | undefined> {
  const { settings, config } = profileSettings(profile, environment);
  if (settings.role_arn) return fromAssumeRole(settings, profile, environment, region, depth);
  const keys = staticCredentials(settings);
  if (keys) return keys;
  if (settings.sso_session || settings.sso_start_url || settings.sso_account_id) return fromSso(settings, config, profile, environment);
  if (settings.credential_process) return fromProcess(settings.credential_process, profile);
  return undefined;
}

/**
 * The first provider of the chain that has credentials, with its name, or undefined when none
 * does (requests then go unsigned). A provider that is configured but fails (a token file that
 * cannot be read, STS refusing the role, an SSO login that expired) is an error, not a reason to
 * go on unsigned.
 */
export async function credentialsFromProviders(
  region: string,
  environment: NodeJS.ProcessEnv = process.env,
  profile: string = environment.AWS_PROFILE ?? 'default',
): Promise<{ credentials: ExpiringCredentials; provider: string } | undefined> {
  const { settings, config } = profileSettings(profile, environment);
  if (settings.role_arn) return { credentials: await fromAssumeRole(settings, profile, environment, region, 0), provider: 'assumed role' };
  if (settings.sso_session || settings.sso_start_url || settings.sso_account_id) return { credentials: await fromSso(settings, config, profile, environment), provider: 'SSO' };
  if (settings.credential_process) return { credentials: await fromProcess(settings.credential_process, profile), provider: 'credential_process' };
  const webIdentity = await fromWebIdentity(environment, region);
  if (webIdentity) return { credentials: webIdentity, provider: 'web identity' };
  const container = await fromContainer(environment);
  if (container) return { credentials: container, provider: 'container endpoint' };
  const instance = await fromInstanceMetadata(environment);
  if (instance) return { credentials: instance, provider: 'instance metadata' };
  return undefined;
}
