/**
 * Tool calling's pieces on their own: a request's tools and tool_choice checked, the guided
 * decoding a named or required choice puts on the answer, the parsers that find an 'auto' answer's
 * calls (hermes, json), and how an answer with tools streams (text until a call could start, the
 * calls as deltas). The server end to end is in openai-server.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { guidedToolCalls, heldBackFrom, parseToolCalls, toolGuidedDecoding, toolRequestOf, type ToolRequest } from '../../lib/llm/tool-calls.js';
import { withToolCalls } from '../../lib/llm/openai-server.js';

const weather = { type: 'function', function: { name: 'get_weather', description: 'The forecast', parameters: { type: 'object', properties: { city: { type: 'string' }, days: { type: 'integer' } }, required: ['city'] } } };
const time = { type: 'function', function: { name: 'get_time', parameters: { type: 'object', properties: { zone: { type: 'string' } } } } };

function request(choice: unknown = 'auto', parallel?: boolean): ToolRequest {
  return toolRequestOf({ tools: [weather, time], tool_choice: choice, ...(parallel === undefined ? {} : { parallel_tool_calls: parallel }) }, 'hermes')!;
}

describe('tool requests', () => {
  it('checks tools and tool_choice, naming what is wrong', () => {
    expect(toolRequestOf({}, undefined)).toBeUndefined();
    expect(toolRequestOf({ tools: [weather], tool_choice: 'none' }, undefined)).toBeUndefined();
    expect(request().choice).toBe('auto');
    expect(request({ type: 'function', function: { name: 'get_time' } }).choice).toEqual({ name: 'get_time' });
    expect(request('required', false)).toMatchObject({ choice: 'required', parallel: false });
    // No parameters: a call with no arguments.
    expect(toolRequestOf({ tools: [{ type: 'function', function: { name: 'ping' } }], tool_choice: 'required' }, undefined)!.tools[0].parameters).toEqual({ type: 'object', properties: {} });
    expect(() => toolRequestOf({ tools: [weather] }, undefined)).toThrow(/tool_choice 'auto' \(the default with tools\) needs the server's toolCallParser/);
    expect(() => toolRequestOf({ tools: [] }, 'hermes')).toThrow(/tools must be a non-empty list/);
    expect(() => toolRequestOf({ tools: [{ type: 'retrieval' }] }, 'hermes')).toThrow(/tools\[0\] must be \{ type: "function"/);
    expect(() => toolRequestOf({ tools: [{ type: 'function', function: { name: 'get weather' } }] }, 'hermes')).toThrow(/tools\[0\]\.function\.name must be 1 to 64 letters/);
    expect(() => toolRequestOf({ tools: [weather, weather] }, 'hermes')).toThrow(/tools name 'get_weather' twice/);
    expect(() => toolRequestOf({ tools: [weather], tool_choice: { type: 'function', function: { name: 'get_time' } } }, 'hermes')).toThrow(/tool_choice names 'get_time', which is not among the tools \(get_weather\)/);
    expect(() => toolRequestOf({ tools: [weather], tool_choice: 'sometimes' }, 'hermes')).toThrow(/tool_choice must be 'none', 'auto', 'required' or/);
    expect(() => toolRequestOf({ tool_choice: 'required' }, 'hermes')).toThrow(/tool_choice "required" needs tools/);
  });

  it('guides a named choice by its parameters, and a required one to a list of calls of the tools', () => {
    expect(toolGuidedDecoding(request())).toBeUndefined();
    expect(toolGuidedDecoding(request({ type: 'function', function: { name: 'get_weather' } }))).toEqual({ json: weather.function.parameters });
    const required = toolGuidedDecoding(request('required', false)) as { json: { type: string; minItems: number; maxItems: number; items: { anyOf: unknown[] } } };
    expect(required.json).toMatchObject({ type: 'array', minItems: 1, maxItems: 1 });
    expect(required.json.items.anyOf).toEqual([
      { type: 'object', properties: { name: { const: 'get_weather' }, parameters: weather.function.parameters }, required: ['name', 'parameters'] },
      { type: 'object', properties: { name: { const: 'get_time' }, parameters: time.function.parameters }, required: ['name', 'parameters'] },
    ]);
    const calls = guidedToolCalls('[{"name": "get_time", "parameters": {"zone": "UTC"}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]', request('required'));
    expect(calls.map((call) => [call.name, call.arguments])).toEqual([['get_time', '{"zone":"UTC"}'], ['get_weather', '{"city":"Oslo"}']]);
    expect(calls[0].id).toMatch(/^call_[0-9a-f]{24}$/);
    expect(guidedToolCalls('[{"name": "get_ti', request('required'))).toEqual([]);
  });
});

describe('tool call parsers', () => {
  it("finds hermes' <tool_call> blocks and the text beside them; what is not a call of a tool stays text", () => {
    const text = 'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>';
    const parsed = parseToolCalls(text, 'hermes', request());
    expect(parsed.content).toBe('Checking both.');
    expect(parsed.calls.map((call) => [call.name, JSON.parse(call.arguments)])).toEqual([['get_weather', { city: 'Paris', days: 2 }], ['get_time', {}]]);
    expect(parseToolCalls(text, 'hermes', request('auto', false)).calls).toHaveLength(1);
    expect(parseToolCalls('<tool_call>{"name": "get_time"}', 'hermes', request()).calls.map((call) => call.name)).toEqual(['get_time']);
    for (const plain of ['No tools needed.', '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>', '<tool_call>{"name": "get_time", </tool_call>']) {
      expect(parseToolCalls(plain, 'hermes', request())).toEqual({ content: plain, calls: [] });
    }
  });

  it("reads Llama's JSON calls: one, a list, after <|python_tag|>, or joined by semicolons", () => {
    const names = (text: string) => parseToolCalls(text, 'json', request()).calls.map((call) => [call.name, JSON.parse(call.arguments)]);
    expect(names(' {"name": "get_weather", "parameters": {"city": "Oslo"}}')).toEqual([['get_weather', { city: 'Oslo' }]]);
    expect(names('[{"name": "get_time", "parameters": {"zone": "CET"}}, {"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]')).toEqual([['get_time', { zone: 'CET' }], ['get_weather', { city: 'Rome' }]]);
    expect(names('<|python_tag|>{"name": "get_time", "parameters": {}}')).toEqual([['get_time', {}]]);
    expect(names('{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}')).toEqual([['get_time', {}], ['get_weather', { city: 'Oslo' }]]);
    expect(parseToolCalls('{"answer": 42}', 'json', request())).toEqual({ content: '{"answer": 42}', calls: [] });
    expect(parseToolCalls('It is sunny.', 'json', request())).toEqual({ content: 'It is sunny.', calls: [] });
  });

  it('holds back streamed text from where a call could start', () => {
    expect(heldBackFrom('Let me look', 'hermes')).toBe(11);
    expect(heldBackFrom('Let me look <tool_', 'hermes')).toBe(12);
    expect(heldBackFrom('Let me look <tool_call>{"na', 'hermes')).toBe(12);
    expect(heldBackFrom('a < b', 'hermes')).toBe(5);
    expect(heldBackFrom('  {"name"', 'json')).toBe(2);
    expect(heldBackFrom('<|pyth', 'json')).toBe(0);
    expect(heldBackFrom('Sunny', 'json')).toBe(5);
    expect(heldBackFrom('  ', 'json')).toBe(2);
  });
});

/** An answer made of these pieces of text, as the server's generation yields them. */
async function* answerOf(pieces: string[]): AsyncGenerator<{ text: string; logprobs: never[] }, { text: string; tokens: number; promptTokens: number; finishReason: 'stop' }, undefined> {
  for (const text of pieces) yield { text, logprobs: [] };
  return { text: pieces.join(''), tokens: pieces.length, promptTokens: 3, finishReason: 'stop' };
}

async function drain<T, R>(generator: AsyncGenerator<T, R, undefined>): Promise<{ pieces: T[]; result: R }> {
  const pieces: T[] = [];
  for (let step = await generator.next(); ; step = await generator.next()) {
    if (step.done) return { pieces, result: step.value };
    pieces.push(step.value);
  }
}

describe('answers with tools, streamed', () => {
  it("streams an 'auto' answer's text until a call starts, then the calls as deltas", async () => {
    const { pieces, result } = await drain(withToolCalls(answerOf(['Sure', ', one moment. <to', 'ol_call>{"name": "get_time", ', '"arguments": {"zone": "UTC"}}</tool_call>']), request(), 'hermes'));
    expect(pieces.filter((piece) => !piece.toolCalls).map((piece) => piece.text).join('')).toBe('Sure, one moment. ');
    const calls = pieces.flatMap((piece) => piece.toolCalls ?? []);
    expect(calls).toEqual([{ index: 0, id: expect.stringMatching(/^call_/), name: 'get_time', arguments: '{"zone":"UTC"}' }]);
    expect(result).toMatchObject({ finishReason: 'tool_calls', content: 'Sure, one moment.', toolCalls: [{ name: 'get_time' }] });
    // No call after all: the held text goes out as text.
    const plain = await drain(withToolCalls(answerOf(['It is ', '<tool_time>', ' now']), request(), 'hermes'));
    expect(plain.pieces.map((piece) => piece.text).join('')).toBe('It is <tool_time> now');
    expect(plain.result.finishReason).toBe('stop');
  });

  it("streams a named function's arguments as its one call's deltas, and a required list whole", async () => {
    const named = await drain(withToolCalls(answerOf(['{"city"', ': "Oslo"', '}']), request({ type: 'function', function: { name: 'get_weather' } }), undefined));
    expect(named.pieces.map((piece) => piece.toolCalls![0])).toEqual([
      { index: 0, id: expect.stringMatching(/^call_/), name: 'get_weather', arguments: '{"city"' },
      { index: 0, arguments: ': "Oslo"' },
      { index: 0, arguments: '}' },
    ]);
    expect(named.result).toMatchObject({ finishReason: 'tool_calls', content: null, toolCalls: [{ id: named.pieces[0].toolCalls![0].id, name: 'get_weather', arguments: '{"city": "Oslo"}' }] });
    const required = await drain(withToolCalls(answerOf(['[{"name": "get_time", "parameters": {}}', ']']), request('required'), undefined));
    expect(required.pieces).toHaveLength(1);
    expect(required.pieces[0].toolCalls).toEqual([{ index: 0, id: expect.stringMatching(/^call_/), name: 'get_time', arguments: '{}' }]);
  });
});
