/**
 * Tool calling for the OpenAI-compatible server, as vLLM serves it: a chat request's `tools` reach
 * the chat template (which tells the model how to call them), and `tool_choice` decides how calls
 * come out of the answer:
 *  - a named function: the answer is that function's arguments, guided by its parameters' JSON
 *    schema, so it always parses and fits;
 *  - 'required': the answer is a JSON list of one or more calls, each { name, parameters } with
 *    the name one of the tools' and the parameters fitting that tool's schema (also guided);
 *  - 'auto': the model answers freely and a parser (the app's `toolCallParser`) finds the calls it
 *    made in the text, in the format its chat template taught it: 'hermes' (<tool_call>{...}
 *    </tool_call> blocks, Qwen's and Hermes'), or 'json' (the answer is one JSON call or a list of
 *    them, Llama 3's, optionally after <|python_tag|>);
 *  - 'none': no calls (the tools are not shown to the template either).
 * Calls go back as OpenAI's `tool_calls` (arguments as a JSON string) with finish_reason
 * 'tool_calls'.
 */
import { randomBytes } from 'node:crypto';
import { InvalidArgumentError } from '../errors.js';
import type { GuidedDecoding } from './guided/guided-decoding.js';

/** How an 'auto' answer's calls are written (see the module's comment). */
export type ToolCallParser = 'hermes' | 'json';

export const TOOL_CALL_PARSERS: readonly ToolCallParser[] = ['hermes', 'json'];

export interface FunctionTool {
  name: string;
  description?: string;
  /** A JSON schema of the arguments (an object); none: no arguments. */
  parameters: Record<string, unknown>;
}

/** A chat request's tools and what it asks of them. */
export interface ToolRequest {
  tools: FunctionTool[];
  choice: 'auto' | 'required' | { name: string };
  /** Several calls in one answer (parallel_tool_calls, default true). */
  parallel: boolean;
  /** The tools as the request gave them, for the chat template. */
  given: unknown[];
}

/** A call as the answer made it. */
export interface ToolCall {
  id: string;
  name: string;
  /** JSON text, as OpenAI sends it. */
  arguments: string;
}

const NAME = /^[a-zA-Z0-9_-]{1,64}$/;
const HERMES_OPEN = '<tool_call>';
const HERMES_CLOSE = '</tool_call>';
const PYTHON_TAG = '<|python_tag|>';

/**
 * The tools a request's body names and how they are to be called; undefined where it names none
 * or tool_choice is 'none'. Throws InvalidArgumentError naming what is malformed, and for 'auto'
 * where the server has no parser.
 */
export function toolRequestOf(body: Record<string, unknown>, parser: ToolCallParser | undefined): ToolRequest | undefined {
  const { tools, tool_choice: choice, parallel_tool_calls: parallel } = body;
  if (tools === undefined || tools === null) {
    if (choice !== undefined && choice !== null && choice !== 'none') throw new InvalidArgumentError(`tool_choice ${JSON.stringify(choice)} needs tools`);
    return undefined;
  }
  if (!Array.isArray(tools) || tools.length === 0) throw new InvalidArgumentError('tools must be a non-empty list of { type: "function", function: { name, description?, parameters? } }');
  const functions = tools.map((tool: unknown, index): FunctionTool => {
    const entry = tool as { type?: unknown; function?: { name?: unknown; description?: unknown; parameters?: unknown } } | null;
    if (typeof entry !== 'object' || entry === null || entry.type !== 'function' || typeof entry.function !== 'object' || entry.function === null) {
      throw new InvalidArgumentError(`tools[${index}] must be { type: "function", function: { name, ... } }`);
    }
    const { name, description, parameters } = entry.function;
    if (typeof name !== 'string' || !NAME.test(name)) throw new InvalidArgumentError(`tools[${index}].function.name must be 1 to 64 letters, digits, '_' or '-', got ${JSON.stringify(name)}`);
    if (description !== undefined && typeof description !== 'string') throw new InvalidArgumentError(`tools[${index}].function.description must be a string`);
    if (parameters !== undefined && (typeof parameters !== 'object' || parameters === null || Array.isArray(parameters))) {
      throw new InvalidArgumentError(`tools[${index}].function.parameters must be a JSON schema object`);
    }
    return { name, ...(description !== undefined ? { description } : {}), parameters: (parameters as Record<string, unknown> | undefined) ?? { type: 'object', properties: {} } };
  });
  const names = functions.map((tool) => tool.name);
  const repeated = names.find((name, index) => names.indexOf(name) !== index);
  if (repeated) throw new InvalidArgumentError(`tools name '${repeated}' twice`);
  if (parallel !== undefined && typeof parallel !== 'boolean') throw new InvalidArgumentError('parallel_tool_calls must be a boolean');
  let resolved: ToolRequest['choice'];
  if (choice === undefined || choice === null || choice === 'auto') {
    resolved = 'auto';
  } else if (choice === 'none') {
    return undefined;
  } else if (choice === 'required') {
    resolved = 'required';
  } else {
    const named = (choice as { type?: unknown; function?: { name?: unknown } }).function?.name;
    if (typeof choice !== 'object' || (choice as { type?: unknown }).type !== 'function' || typeof named !== 'string') {
      throw new InvalidArgumentError(`tool_choice must be 'none', 'auto', 'required' or { type: "function", function: { name } }, got ${JSON.stringify(choice)}`);
    }
    if (!names.includes(named)) throw new InvalidArgumentError(`tool_choice names '${named}', which is not among the tools (${names.join(', ')})`);
    resolved = { name: named };
  }
  if (resolved === 'auto' && parser === undefined) {
    throw new InvalidArgumentError("tool_choice 'auto' (the default with tools) needs the server's toolCallParser ('hermes' or 'json'), to find the calls in the answer; or ask for 'required' or a named function");
  }
  return { tools: functions, choice: resolved, parallel: parallel !== false, given: tools };
}

/** The guided decoding a named or required choice puts on the answer; none for 'auto'. */
export function toolGuidedDecoding(request: ToolRequest): GuidedDecoding | undefined {
  const { choice, tools } = request;
  if (choice === 'auto') return undefined;
  if (choice !== 'required') return { json: tools.find((tool) => tool.name === choice.name)!.parameters };
  const call = (tool: FunctionTool) => ({ type: 'object', properties: { name: { const: tool.name }, parameters: tool.parameters }, required: ['name', 'parameters'] });
  return { json: { type: 'array', minItems: 1, ...(request.parallel ? {} : { maxItems: 1 }), items: tools.length === 1 ? call(tools[0]) : { anyOf: tools.map(call) } } };
}

/** A call of `name` with these arguments (JSON text), under an id of its own. */
export function toolCall(name: string, args: string): ToolCall {
  return { id: `call_${randomBytes(12).toString('hex')}`, name, arguments: args };
}

/** A call out of a parsed JSON value: { name, arguments | parameters } naming one of the tools; undefined otherwise. */
function callOf(value: unknown, names: ReadonlySet<string>): ToolCall | undefined {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return undefined;
  const { name } = value as { name?: unknown };
  const args = (value as { arguments?: unknown }).arguments ?? (value as { parameters?: unknown }).parameters ?? {};
  if (typeof name !== 'string' || !names.has(name)) return undefined;
  return toolCall(name, typeof args === 'string' ? args : JSON.stringify(args));
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/**
 * The calls an 'auto' answer made and the text beside them (null where there is none). Text that
 * does not parse as calls, or names no tool of the request, stays text: a model that meant to call
 * and failed to write a call answers in words.
 */
export function parseToolCalls(text: string, parser: ToolCallParser, request: ToolRequest): { content: string | null; calls: ToolCall[] } {
  const names = new Set(request.tools.map((tool) => tool.name));
  if (parser === 'hermes') {
    const calls: ToolCall[] = [];
    let content = '';
    let at = 0;
    for (;;) {
      const open = text.indexOf(HERMES_OPEN, at);
      if (open < 0) break;
      const close = text.indexOf(HERMES_CLOSE, open + HERMES_OPEN.length);
      const body = text.slice(open + HERMES_OPEN.length, close < 0 ? text.length : close);
      const call = callOf(parseJson(body.trim()), names);
      if (!call) break;
      content += text.slice(at, open);
      calls.push(call);
      at = close < 0 ? text.length : close + HERMES_CLOSE.length;
    }
    if (calls.length === 0) return { content: text, calls };
    content += text.slice(at);
    return { content: content.trim() === '' ? null : content.trim(), calls: request.parallel ? calls : calls.slice(0, 1) };
  }
  let body = text.trim();
  if (body.startsWith(PYTHON_TAG)) body = body.slice(PYTHON_TAG.length).trim();
  const value = parseJson(body);
  // One call, a list of them, or Llama's calls joined by semicolons.
  const values = Array.isArray(value) ? value : value !== undefined ? [value] : body.includes(';') ? body.split(';').map((part) => parseJson(part.trim())) : [];
  const calls = values.map((item) => callOf(item, names));
  if (calls.length === 0 || calls.some((call) => call === undefined)) return { content: text, calls: [] };
  return { content: null, calls: request.parallel ? (calls as ToolCall[]) : (calls as ToolCall[]).slice(0, 1) };
}

/** The calls a guided answer (a named or required choice) spells: it fits the schema, so it parses. */
export function guidedToolCalls(text: string, request: ToolRequest): ToolCall[] {
  const { choice } = request;
  if (choice === 'auto') throw new InvalidArgumentError("guidedToolCalls() reads a named or required choice's answer");
  if (choice !== 'required') return [toolCall(choice.name, text.trim())];
  const list = parseJson(text) as Array<{ name: string; parameters: unknown }> | undefined;
  // The guide ends a list only where it is whole; an answer cut at max_tokens may not be.
  if (!Array.isArray(list)) return [];
  return list.map((item) => toolCall(item.name, JSON.stringify(item.parameters)));
}

/**
 * Where an 'auto' answer streamed so far could be starting a call (so the text from there is held
 * back until the answer ends); the text's length where it cannot.
 */
export function heldBackFrom(text: string, parser: ToolCallParser): number {
  if (parser === 'json') {
    // Llama's calls are the whole answer: decided by its first characters.
    const start = text.length - text.trimStart().length;
    const head = text.slice(start);
    if (head === '') return start;
    if (head.startsWith('{') || head.startsWith('[') || PYTHON_TAG.startsWith(head.slice(0, PYTHON_TAG.length))) return start;
    return text.length;
  }
  const open = text.indexOf(HERMES_OPEN);
  if (open >= 0) return open;
  // The end may be the start of the marker.
  for (let length = Math.min(HERMES_OPEN.length - 1, text.length); length > 0; length--) {
    if (HERMES_OPEN.startsWith(text.slice(text.length - length))) return text.length - length;
  }
  return text.length;
}
