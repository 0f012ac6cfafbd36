"""Benchmark scoring on crafted predictions, against scores worked out by hand (equality with
lmms-eval's own code: test_eval_lmms_parity.py)."""

import argparse
import json

import pytest
from etils import epath

from lavi_jax.data.errors import DataError
from lavi_jax.eval import __main__ as cli
from lavi_jax.eval import runner, scoring, tasks
from lavi_jax.eval.vqa_normalize import normalize_answer, textvqa_accuracy, vqav2_accuracy


def run(task, docs_and_responses):
  """Per-sample scores, then each metric's aggregation (as the runner does)."""
  per_metric = {m: [] for m in task.metrics}
  for doc, response in docs_and_responses:
    for metric, value in runner.score(task, doc, response)[1].items():
      per_metric[metric].append(value)
  return {m: agg(per_metric[m]) for m, agg in task.metrics.items() if per_metric[m]}


def test_mme_scores_image_pairs_with_acc_plus():
  doc = lambda image, category, answer: dict(question_id=image, category=category,
                                             answer=answer, question='Is it? Please answer yes or no.')
  scores = run(tasks.MME, [
      # existence: image 1 both right (acc 100 + acc+ 100 = 200), image 2 one right (50 + 0)
      (doc('e1.png', 'existence', 'Yes'), 'Yes'), (doc('e1.png', 'existence', 'No'), 'no.'),
      (doc('e2.png', 'existence', 'Yes'), 'yes, there is'), (doc('e2.png', 'existence', 'No'),
                                                             'Yes'),
      # count: one image, neither right ('maybe' is other) -> 0
      (doc('c1.png', 'count', 'Yes'), 'maybe'), (doc('c1.png', 'count', 'No'), 'y'),
      # code_reasoning (cognition): both right (the reasoning block is not scored) -> 200
      (doc('k1.png', 'code_reasoning', 'No'), '<think>Yes? No.</think> No'),
      (doc('k1.png', 'code_reasoning', 'Yes'), 'Y'),
  ])
  # perception = existence (200 + 50) / 2 + count 0 = 125
  assert scores == {'mme_perception_score': 125.0, 'mme_cognition_score': 200.0}
  assert tasks.MME.prompt(doc('x', 'count', 'Yes')) == \
      'Is it?\nAnswer the question using a single word or phrase.'
  with pytest.raises(DataError, match="image 'c1.png'"):
    run(tasks.MME, [(doc('c1.png', 'count', 'Yes'), 'yes')])


def test_pope_matches_exactly():
  task = tasks.TASKS['pope_adv']
  doc = lambda answer: dict(question_id='q', answer=answer, question='Is there a dog?')
  scores = run(task, [(doc('yes'), 'Yes'), (doc('yes'), 'Yes.'), (doc('yes'), 'no'),
                      (doc('no'), 'yes'), (doc('no'), ' No '), (doc('no'), 'No, there is not')])
  # right: 'Yes', ' No ' -> 2 of 6. tp 1 ('Yes'), fp 1, fn 1 ('no'); 'Yes.' and the sentence
  # count as neither.
  assert scores['pope_accuracy'] == pytest.approx(2 / 6)
  assert scores['pope_precision'] == 0.5 and scores['pope_recall'] == 0.5
  assert scores['pope_f1_score'] == 0.5
  assert scores['pope_yes_ratio'] == 0.5  # lmms-eval: share of 'yes' ground truths
  assert task.data == 'pope/adversarial' and task.max_new_tokens == 128
  with pytest.raises(DataError, match='yes or no'):
    run(task, [(doc('maybe'), 'yes')])


def test_mmbench_circular_groups_and_rule_based_extraction():
  base = dict(question='Which animal?', hint=None, category='c1', source='s', split='dev',
              **{'L2-category': 'l2'})
  options = dict(A='cat', B='dog', C='bird', D='fish')
  shifted = dict(A='dog', B='bird', C='fish', D='cat')
  docs = [
      (dict(base, index=1, answer='A', **options), 'A'),
      (dict(base, index=1_000_001, answer='D', **shifted), 'The answer is (D).'),
      (dict(base, index=2, answer='B', **options), 'B'),
      (dict(base, index=1_000_002, answer='A', **shifted), 'a dog'),  # text -> A: right
      (dict(base, index=2_000_002, answer='D', **shifted), 'C'),  # one shift wrong
      (dict(base, index=3, answer='C', category='c2', **options), 'I think it is a bird'),
      # no option D: kept as 'nan', which 'banana' holds, so the text is ambiguous and the
      # fallback finds no capital letter
      (dict(base, index=4, answer='C', A='cat', B='dog', C='bird'),
       'It is a bird, not a banana'),
      (dict(base, index=2_000_005, answer='A', **options), 'A'),  # a shift without question
  ]
  # questions: 1 all right; 2 has a wrong shift; 3 'bird' (text only, 'A' is an article)
  # right; 4 wrong
  assert run(tasks.MMBENCH, docs) == {'gpt_eval_score': 50.0}
  samples = [tasks.MMBENCH.process(d, r)['gpt_eval_score'] for d, r in docs]
  assert [scoring.mmbench_answer(s) for s in samples] == ['A', 'D', 'B', 'A', 'C', 'C', '', 'A']
  assert samples[0]['L2-category'] == 'l2' and samples[6]['D'] == 'nan'
  assert scoring.mmbench_options(samples[6]) == dict(A='cat', B='dog', C='bird', D='nan')
  assert scoring.mmbench_options(dict(samples[0], C=None, D=float('nan'))) == \
      dict(A='cat', B='dog')
  lowercase = dict(docs[0][0], **{'l2-category': 'x'})
  del lowercase['L2-category']
  assert tasks.MMBENCH.process(lowercase, 'A')['gpt_eval_score']['L2-category'] == 'x'
  # neither rule decides; the fallback takes a letter at the end
  assert scoring.mmbench_answer(dict(samples[0], prediction='cat or dog? D')) == 'D'
  assert tasks.MMBENCH.prompt(dict(docs[0][0], hint='Look.')) == (
      "Look. Which animal? There are several options:\nA. cat\nB. dog\nC. bird\nD. fish\n\n"
      "Answer with the option's letter from the given choices directly.")


def test_reasoning_blocks_are_removed_before_scoring():
  tags = scoring.REASONING_TAGS
  assert scoring.strip_reasoning_tags('<think>A?</think> B <analysis>C</analysis>', tags) == 'B'
  assert scoring.strip_reasoning_tags('prefilled start tag</think> B', tags) == 'B'
  assert scoring.strip_reasoning_tags('<think>unclosed B', tags) == '<think>unclosed B'
  assert scoring.strip_reasoning_tags('<THINK>B</THINK>', tags) == '<THINK>B</THINK>'  # case
  doc = dict(question='q', answer='Yes', question_id='1')
  assert runner.score(tasks.TASKS['pope'], doc, '<think>no</think>Yes') == \
      ('Yes', {m: dict(question_id='1', score=1.0, prediction='yes', ground_truth='yes')
               for m in tasks.POPE_METRICS})
  assert runner.score(tasks.TASKS['pope'], doc, '<think>no</think>Yes', None)[0] == \
      '<think>no</think>Yes'
  # the command line: lmms-eval's default, 'none', or other pairs
  assert cli.reasoning_tags('[["<think>", "</think>"], ["<analysis>", "</analysis>"]]') == \
      [list(pair) for pair in tags]
  assert cli.reasoning_tags('none') is None
  assert cli.reasoning_tags('default') == [['<think>', '</think>'], ['<analysis>', '</analysis>']]
  assert cli.reasoning_tags('[["<r>", "</r>"]]') == [['<r>', '</r>']]
  for bad in ('<think>', '[["<think>"]]', '[["", "</think>"]]'):
    with pytest.raises(argparse.ArgumentTypeError):
      cli.reasoning_tags(bad)


def test_vqa_normalisation():
  assert normalize_answer('Two dogs.') == '2 dogs'
  assert normalize_answer("The man's hat!") == "man 's hat"
  assert normalize_answer('dont know') == "don't know"
  assert normalize_answer('1,000') == '1000'
  assert normalize_answer('red-white') == 'red white'
  # the reference drops at most 32 periods (it passes re.UNICODE as the count)
  assert normalize_answer('.' * 34 + 'x') == '..x'


def test_vqa_accuracy_over_ten_answers():
  answers = ['2'] * 3 + ['two'] + ['3'] * 6
  # textvqa normalises every answer: '2' x4, '3' x6. Predicting 'two': leaving out one of the
  # four '2's leaves 3 matches (1.0); leaving out a '3' leaves 4 (1.0) -> 1.0.
  assert textvqa_accuracy('Two', answers) == 1.0
  # vqav2: the answers get digits too: same 4 x '2' -> 1.0
  records = lambda answers: [dict(answer=a, answer_id=i) for i, a in enumerate(answers)]
  assert vqav2_accuracy('Two', records(answers)) == 1.0
  two = ['yes', 'yes'] + ['no'] * 8
  # 'yes': leaving out a 'yes' leaves 1 match (1/3), leaving out a 'no' leaves 2 (2/3):
  # (2 * 1/3 + 8 * 2/3) / 10 = 0.6
  assert textvqa_accuracy('Yes', two) == pytest.approx(0.6)
  assert vqav2_accuracy('yes.', records(two)) == pytest.approx(0.6)
  # vqav2 drops punctuation, digits and articles of every answer, agreeing or not
  assert vqav2_accuracy('the Dog', records(['dog'] * 10)) == 1.0
  # an answer leaves with every record equal to its own: without answer ids, leaving out a
  # 'yes' leaves no 'yes' (0), leaving out a 'no' leaves both (2/3): 8 * 2/3 / 10
  assert vqav2_accuracy('yes', [dict(answer=a) for a in two]) == pytest.approx(1.6 / 3)
  scores = run(tasks.VQAV2, [(dict(question='How many?', question_id=1,
                                   answers=[dict(answer=a, answer_id=i)
                                            for i, a in enumerate(two)]), 'no')])
  assert scores == {'exact_match': pytest.approx(1.0)}


def test_short_answer_and_choice_tasks():
  assert run(tasks.GQA, [(dict(question='q', answer='Left'), 'left.'),
                         (dict(question='q', answer='red'), 'red car')]) == {'exact_match': 0.5}
  sqa = dict(question='Which?', hint='', choices=['x', 'y', 'z'], answer=2)
  assert tasks.SCIENCEQA.prompt(sqa) == (
      "Which?\nA. x\nB. y\nC. z\nAnswer with the option's letter from the given choices "
      'directly.')
  # 'c' is right (case ignored), 'c. z' is not (the 'X.' form needs a capital)
  assert run(tasks.SCIENCEQA, [(sqa, 'C'), (sqa, 'C. z'), (sqa, 'c'), (sqa, 'c. z'),
                               (sqa, 'The answer is C')]) == {'exact_match': 0.6}
  seed = lambda kind, answer: dict(question='q', choice_a='a', choice_b='b', choice_c='c',
                                   choice_d='d', answer=answer, data_type=kind, question_id=0)
  # SEED-Bench takes the first character: 'Because' answers B; case is ignored
  assert run(tasks.SEEDBENCH, [(seed('image', 'A'), 'a'), (seed('image', 'C'), 'Because'),
                               (seed('video', 'C'), ' C.')]) == \
      {'seed_image': 0.5, 'seed_video': 1.0, 'seed_all': pytest.approx(2 / 3)}
  mme = dict(question='q', options=['A. x', 'B. y', 'C. z', 'D. w'], question_id='1',
             videoID='v', duration='short', domain='d', sub_category='s', task_type='t')
  assert tasks.VIDEOMME.prompt(dict(mme, answer='B')).endswith(
      "D. w\n\nAnswer with the option's letter from the given choices directly.")
  scores = [(dict(mme, answer='B'), 'The best answer is B'),
            (dict(mme, answer='A'), 'I am not sure about this one at all, it could be anything'),
            (dict(mme, answer='C'), 'D'), (dict(mme, answer='D'), 'Both (A) and (D).'),
            (dict(mme, answer='d'), 'D')]
  # right: B, D ('(D)' is the last of the best form); 'D' for 'd' scores 1 per sample, but the
  # aggregate compares case-sensitively
  assert [runner.score(tasks.VIDEOMME, d, r)[1]['videomme_perception_score']['score']
          for d, r in scores] == [1.0, 0.0, 0.0, 1.0, 1.0]
  assert run(tasks.VIDEOMME, scores) == {'videomme_perception_score': 40.0}


def test_mvbench_letters_and_answered_samples():
  task = tasks.TASKS['mvbench_action_count']
  doc = dict(question='How many?', candidates=['1', '2', '3'], answer='2', video='x.mp4')
  assert task.prompt(doc) == ("Question:How many?\nOption:\n(A) 1\n(B) 2\n(C) 3\n"
                              'Only give the best option.\n')
  # '(B) 2' -> B right, 'B. two' -> B right, 'A' and '.' wrong, '' unanswered (not counted)
  assert run(task, [(doc, '(B) 2'), (doc, 'B. two'), (doc, 'A'), (doc, '.'), (doc, '')]) == \
      {'mvbench_accuracy': pytest.approx(200 / 4)}
  assert task.process(doc, '.')['mvbench_accuracy'] == {'pred_answer': '.', 'gt_answer': 'B',
                                                        'score': 0}
  with pytest.raises(DataError, match='not one of the candidates'):
    task.target(dict(doc, answer='4'))


def test_resolve_expands_groups():
  names = [t.name for t in tasks.resolve('mme, mvbench,mme')]
  assert names[0] == 'mme' and len(names) == 21 and names[1] == 'mvbench_object_interaction'
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    tasks.resolve('nope')


def test_limit_keeps_question_pairs_and_task_bugs_raise(tmp_path):
  path = epath.Path(tmp_path / 'test.jsonl')
  path.write_text(''.join(json.dumps(dict(question_id=q)) + '\n' for q in 'aabbc'))
  docs, total = runner._read(tasks.MME, path, 3)  # 3 would split pair b
  assert [d['question_id'] for d in docs] == ['a', 'a'] and total == 5
  assert len(runner._read(tasks.MME, path, 4)[0]) == 4
  assert len(runner._read(tasks.GQA, path, 3)[0]) == 3  # no groups
  with pytest.raises(DataError, match='test.jsonl record 0: missing field'):
    with runner._naming(path, 0):
      raise KeyError('image')
  with pytest.raises(TypeError):  # a bug in task code keeps its traceback
    with runner._naming(path, 0):
      raise TypeError('a bug')
