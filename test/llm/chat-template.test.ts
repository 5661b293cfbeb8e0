import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ChatTemplate, InvalidArgumentError, ModelLoadError, rowsToBlock, blockToRows } from '../../lib/index.js';

/**
 * Templates in the shapes instruction-tuned checkpoints ship (written for these tests): header
 * markers around each turn with the beginning-of-text token first; a system prompt folded into
 * the first user turn with a check that roles alternate; a loop over content parts.
 */
const HEADER_TEMPLATE = [
  '{{- bos_token }}',
  '{%- for message in messages %}',
  "{{- '<|start|>' + message['role'] + '<|sep|>\\n\\n' + message['content'] | trim + '<|end|>' }}",
  '{%- endfor %}',
  "{%- if add_generation_prompt %}{{- '<|start|>assistant<|sep|>\\n\\n' }}{%- endif %}",
].join('\n');

const ALTERNATING_TEMPLATE = [
  "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set turns = messages[1:] %}",
  "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}",
  '{{- bos_token }}',
  '{%- for message in turns %}',
  "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('turns must alternate user/assistant/user/...') }}{%- endif %}",
  "{%- if message['role'] == 'user' %}{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}",
  "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}",
  '{%- endfor %}',
].join('\n');

const PARTS_TEMPLATE = [
  '{%- for message in messages %}<{{ message.role }}>',
  '{%- if message.content is string %}{{ message.content }}',
  "{%- else %}{%- for part in message.content %}{%- if part.type == 'text' %}{{ part.text }}{%- else %}[{{ part.type }}]{%- endif %}{%- endfor %}{%- endif %}",
  '{%- endfor %}{%- if add_generation_prompt %}<assistant>{%- endif %}{%- if tools %} tools={{ tools | length }}{%- endif %}',
].join('\n');

describe('chat templates', () => {
  let directory: string;
  beforeAll(() => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-chat-'));
  });
  afterAll(() => rmSync(directory, { recursive: true, force: true }));

  function checkpointWith(name: string, config: Record<string, unknown> | undefined, files: Record<string, string> = {}): string {
    const path = join(directory, name);
    mkdirSync(path, { recursive: true });
    if (config) writeFileSync(join(path, 'tokenizer_config.json'), JSON.stringify(config));
    for (const [file, text] of Object.entries(files)) {
      mkdirSync(join(path, file, '..'), { recursive: true });
      writeFileSync(join(path, file), text);
    }
    return path;
  }

  it("renders a checkpoint's template with its special tokens, opened for the assistant or not", () => {
    // bos_token as an AddedToken object, as tokenizers save it.
    const path = checkpointWith('header', { bos_token: { __type: 'AddedToken', content: '<|bos|>', special: true }, eos_token: '<|eos|>', chat_template: HEADER_TEMPLATE });
    const template = ChatTemplate.load(path);
    expect(template.specialTokens).toEqual({ bos_token: '<|bos|>', eos_token: '<|eos|>' });
    const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: '  What is 2 + 2?\n' }];
    expect(template.render(messages)).toBe('<|bos|><|start|>system<|sep|>\n\nBe brief.<|end|><|start|>user<|sep|>\n\nWhat is 2 + 2?<|end|><|start|>assistant<|sep|>\n\n');
    expect(template.render(messages, { addGenerationPrompt: false })).toBe('<|bos|><|start|>system<|sep|>\n\nBe brief.<|end|><|start|>user<|sep|>\n\nWhat is 2 + 2?<|end|>');
    // The tokenizer_config.json named directly reads the same.
    expect(ChatTemplate.load(join(path, 'tokenizer_config.json')).render(messages)).toBe(template.render(messages));
  });

  it('folds a system prompt into the first turn, and passes on what the template refuses', () => {
    const path = checkpointWith('alternating', { bos_token: '<s>', eos_token: '</s>', chat_template: ALTERNATING_TEMPLATE });
    const template = ChatTemplate.load(path);
    const conversation = [
      { role: 'system', content: 'You are terse.' },
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello.' },
      { role: 'user', content: 'Bye' },
    ];
    expect(template.render(conversation)).toBe('<s>[INST] You are terse.\n\nHi [/INST] Hello.</s>[INST] Bye [/INST]');
    let thrown: unknown;
    try {
      template.render([{ role: 'user', content: 'a' }, { role: 'user', content: 'b' }]);
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toBeInstanceOf(InvalidArgumentError);
    expect(thrown).toMatchObject({ code: 'ERR_CHAT_TEMPLATE' });
    expect((thrown as Error).message).toContain('turns must alternate user/assistant/user/...');
    expect((thrown as Error).message).toContain('tokenizer_config.json');
  });

  it('prefers chat_template.jinja, picks named templates, and takes a source of its own', () => {
    const config = { eos_token: '</s>', chat_template: [{ name: 'default', template: 'config default' }, { name: 'tool_use', template: 'config tools {{ eos_token }}' }] };
    const named = checkpointWith('named', config);
    expect(ChatTemplate.load(named).render([])).toBe('config default');
    expect(ChatTemplate.load(named, { name: 'tool_use' }).render([])).toBe('config tools </s>');
    expect(() => ChatTemplate.load(named, { name: 'rag' })).toThrow(/no chat template named 'rag' \(it has 'default', 'tool_use'\)/);
    // A checkpoint saved by newer tools: the default in its own file, others in a folder.
    const files = checkpointWith('files', config, { 'chat_template.jinja': 'file default {{ eos_token }}', 'additional_chat_templates/tool_use.jinja': 'file tools' });
    expect(ChatTemplate.load(files).render([])).toBe('file default </s>');
    expect(ChatTemplate.load(files, { name: 'tool_use' }).render([])).toBe('file tools');
    expect(ChatTemplate.load(join(files, 'chat_template.jinja')).render([])).toBe('file default </s>');
    expect(ChatTemplate.load(files, { source: 'mine {{ eos_token }}' }).render([])).toBe('mine </s>');
    expect(() => ChatTemplate.load(files, { name: '../x' })).toThrow(InvalidArgumentError);
  });

  it('hands content parts, extra fields and variables to the template, from plain objects or Arrow rows', () => {
    const template = new ChatTemplate(PARTS_TEMPLATE);
    const messages = [{ role: 'user', content: [{ type: 'text', text: 'Describe ' }, { type: 'image' }, { type: 'text', text: 'please' }] }];
    expect(template.render(messages, { variables: { tools: [{ name: 'a' }, { name: 'b' }] } })).toBe('<user>Describe [image]please<assistant> tools=2');
    // Rows read back from an Arrow block hold list and struct values.
    const [row] = blockToRows(rowsToBlock([{ messages: [{ role: 'system', content: 'S' }, { role: 'user', content: 'U' }] }]));
    expect(template.render(row.messages as never)).toBe('<system>S<user>U<assistant>');
  });

  it('names what is wrong with the messages', () => {
    const template = new ChatTemplate(HEADER_TEMPLATE, { bos_token: '' });
    const cases: Array<[unknown, string]> = [
      ['hello', 'messages must be an array of { role, content } turns, got a string'],
      [[{ role: 'user', content: 'a' }, 'b'], 'message 1 must be an object with a role and content, got a string'],
      [[{ content: 'a' }], 'message 0 needs a role (a non-empty string), got nothing'],
      [[{ role: 'user', content: 42 }], 'message 0 (user): content must be a string or a list of parts, got a number'],
    ];
    for (const [messages, fragment] of cases) {
      let thrown: unknown;
      try {
        template.render(messages as never);
      } catch (error) {
        thrown = error;
      }
      expect(thrown).toBeInstanceOf(InvalidArgumentError);
      expect(thrown).toMatchObject({ code: 'ERR_CHAT_MESSAGES' });
      expect((thrown as Error).message).toContain(fragment);
    }
    expect(() => template.render([], { variables: [] as never })).toThrow(/variables must be an object, got an array/);
  });

  it('refuses templates that are missing or do not parse, naming the file', () => {
    const base = checkpointWith('base', { bos_token: '<s>' });
    const missing = (() => {
      try {
        ChatTemplate.load(base);
      } catch (error) {
        return error;
      }
    })();
    expect(missing).toBeInstanceOf(ModelLoadError);
    expect(missing).toMatchObject({ code: 'ERR_CHAT_TEMPLATE', file: join(base, 'tokenizer_config.json') });
    expect((missing as Error).message).toContain('no chat template');
    const broken = checkpointWith('broken', {}, { 'chat_template.jinja': '{% for message in %}' });
    expect(() => ChatTemplate.load(broken)).toThrow(/chat_template\.jinja does not parse/);
    expect(() => ChatTemplate.load(join(directory, 'nowhere'))).toThrow(ModelLoadError);
    const invalid = checkpointWith('invalid', undefined, { 'tokenizer_config.json': '{ not json' });
    expect(() => ChatTemplate.load(invalid)).toThrow(/tokenizer_config\.json is not valid JSON/);
    const wrongType = checkpointWith('wrong-type', { chat_template: 7 });
    expect(() => ChatTemplate.load(wrongType)).toThrow(/chat_template must be a string or a list of named templates, got a number/);
    expect(() => new ChatTemplate('')).toThrow(/a chat template must be a non-empty string/);
  });
});
