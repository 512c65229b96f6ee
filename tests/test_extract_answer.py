"""extract_answer 的参数化测试：覆盖显式答案、多次作答、markdown、截断、医学伪字母等真实输出形态。"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest

from scoring import extract_answer

CASES: list[tuple[str, str | None]] = [
    # ---------- 各种显式形式 ----------
    (
        "A 58-year-old man presents with crushing chest pain radiating to the left arm. "
        "ECG shows ST elevation in leads II, III and aVF, consistent with an inferior MI. "
        "The right coronary artery supplies the inferior wall in most patients.\n"
        "The answer is C",
        "C",
    ),
    (
        "The patient has a positive Nikolsky sign and flaccid bullae involving the oral mucosa. "
        "This is consistent with pemphigus vulgaris, caused by antibodies against desmoglein 3. "
        "Therefore, the correct answer is (B).",
        "B",
    ),
    (
        "Step 1: Identify the acid-base disorder. pH 7.29, HCO3 14, so metabolic acidosis.\n"
        "Step 2: Anion gap = 140 - (104 + 14) = 22, elevated.\n"
        "Step 3: In a patient with polyuria and fruity breath this is diabetic ketoacidosis.\n\n"
        "Answer: (B)",
        "B",
    ),
    (
        "## Reasoning\nThe infant has bilious vomiting on day 2 of life and a 'double bubble' sign. "
        "Given the association with trisomy 21, duodenal atresia is most likely.\n\n"
        "**Final answer: D**",
        "D",
    ),
    (
        "Hyperkalemia with peaked T waves requires immediate membrane stabilization. "
        "Calcium gluconate does not lower potassium but protects the myocardium.\n\n"
        "Final Answer: **A**",
        "A",
    ),
    (
        "The child's symptoms (honey-colored crusts around the nose) are typical of impetigo. "
        "For localized disease topical mupirocin is first-line, so the correct option is A.",
        "A",
    ),
    (
        "A 23-year-old woman has episodic palpitations, headaches and diaphoresis with "
        "blood pressure 190/110 mm Hg. Elevated plasma metanephrines confirm the diagnosis. "
        "Alpha blockade must precede beta blockade. The best answer is B.",
        "B",
    ),
    (
        "Isoniazid causes peripheral neuropathy via pyridoxine depletion, so supplementation "
        "is indicated. The answer is option D.",
        "D",
    ),
    (
        "Given the low serum ceruloplasmin and Kayser-Fleischer rings, this is Wilson disease. "
        "Penicillamine chelates copper. I would choose C.",
        "C",
    ),
    (
        "The patient is hypertensive and has hypokalemia with a low renin level. This pattern "
        "suggests primary hyperaldosteronism.\nTherefore, the answer is: B. Hypertension "
        "secondary to an aldosterone-producing adenoma",
        "B",
    ),
    ("Let's think step by step.\nThe findings point to hypothyroidism.\nANSWER: c", "C"),
    (
        "Fever, new murmur and splinter hemorrhages in an IV drug user suggest infective "
        "endocarditis of the tricuspid valve, most often due to Staphylococcus aureus.\n"
        "The answer is $\\boxed{B}$",
        "B",
    ),
    (
        "Clinical picture: ascending paralysis after a Campylobacter infection, areflexia, "
        "albuminocytologic dissociation. This is Guillain-Barre syndrome.\n"
        "The answer is B) Guillain-Barre syndrome",
        "B",
    ),
    ("The answer is \\boxed{\\text{A}}.", "A"),
    ("**Answer**: C. Hyperparathyroidism", "C"),
    ("Thus D is the correct answer.", "D"),
    # ---------- 多次作答：最后一次为准 ----------
    (
        "Initially the answer is A because of the elevated troponin. However, the ECG is normal "
        "and the pain is pleuritic and relieved by leaning forward, which fits pericarditis. "
        "Wait, let me reconsider. The answer is C.",
        "C",
    ),
    (
        "Answer: (B)\n\nOn re-evaluation, the low CD4 count and ring-enhancing lesions favor "
        "toxoplasmosis over lymphoma.\nFinal answer: D",
        "D",
    ),
    (
        "The answer is B.\nExplanation: The patient has ...\nThe answer is B.\n"
        "Actually, the correct answer is (A).",
        "A",
    ),
    # ---------- 推理中大量提及其它字母，最后给出答案 ----------
    (
        "Let's evaluate each option.\n"
        "Option A is wrong because methotrexate is teratogenic and contraindicated in pregnancy.\n"
        "B. Hypertension can be ruled out since blood pressure is 118/76 mm Hg.\n"
        "(C) is tempting, but the rash spares the nasolabial folds.\n"
        "D matches the photosensitive malar rash and anti-dsDNA antibodies.\n"
        "The answer is D.",
        "D",
    ),
    (
        "A: Acute tubular necrosis — muddy brown casts would be expected, not present.\n"
        "B: Prerenal azotemia — BUN/Cr ratio of 28 and FeNa < 1% support this.\n"
        "C: Postrenal obstruction — no hydronephrosis on ultrasound.\n"
        "D: Interstitial nephritis — no eosinophiluria or rash.\n\n"
        "Therefore, the answer is B.",
        "B",
    ),
    (
        "Group B strep is an important cause of neonatal sepsis, and vitamin B12 deficiency "
        "causes subacute combined degeneration, but neither applies here. The HbA1c of 9.1% "
        "indicates poor glycemic control. Type A aortic dissection is excluded by CT. "
        "The answer is A.",
        "A",
    ),
    # ---------- markdown / 大小写 / 空白 ----------
    (
        "### Step-by-step\n1. Painless jaundice and a palpable gallbladder (Courvoisier sign).\n"
        "2. Weight loss in a smoker.\n\n### Conclusion\n**The answer is C**\n\n",
        "C",
    ),
    (
        "the patient most likely has iron deficiency anemia given the low ferritin.\n"
        "the answer is (d).",
        "D",
    ),
    ("Microcytic anemia with high RDW and low ferritin.\nThe answer is A.   \n\n\t\n", "A"),
    ("Correct Answer: b\n<|eot_id|>", "B"),
    (
        "The presentation is classic for temporal arteritis; start high-dose steroids "
        "before biopsy to prevent blindness.\n\nThe answer is:\n\n**C. Prednisone**",
        "C",
    ),
    # ---------- 回退：最后一行孤立字母 ----------
    (
        "Symptoms: tremor at rest, bradykinesia, cogwheel rigidity. These are due to loss of "
        "dopaminergic neurons in the substantia nigra pars compacta.\n\nB",
        "B",
    ),
    ("Elevated TSH with low free T4 indicates primary hypothyroidism.\n(D)", "D"),
    ("The most appropriate next step is a CT angiogram of the chest.\n\n**A**", "A"),
    (
        "The patient's murmur increases with Valsalva and decreases with squatting, "
        "consistent with hypertrophic cardiomyopathy.\nC. Hypertrophic cardiomyopathy",
        "C",
    ),
    ("Based on the above reasoning:\nB.", "B"),
    # ---------- 第 2 层：结论句 + 行尾括号 ----------
    (
        "Episodic headaches, palpitations and sweating with paroxysmal hypertension. "
        "The most likely diagnosis is pheochromocytoma (B).",
        "B",
    ),
    # ---------- 应返回 None ----------
    ("", None),
    ("   \n\n  ", None),
    (
        "A 45-year-old woman presents with fatigue and weight gain for six months. She reports "
        "cold intolerance and constipation. A physical examination shows dry skin and a "
        "delayed relaxation phase of the ankle reflexes. A thyroid panel is ordered.",
        None,
    ),
    (
        "Let's think step by step. The patient is a 67-year-old man with progressive dyspnea "
        "and bibasilar crackles. A chest radiograph shows reticular opacities. Considering "
        "option B, amiodarone toxicity could explain the findings, but the patient has been "
        "on the drug only for two weeks, which is",
        None,
    ),
    (
        "The neurological findings of loss of vibration sense and proprioception, along with a "
        "macrocytic anemia, suggest vitamin B12 deficiency. Pernicious anemia is a common cause "
        "in older adults, and hepatitis B is not relevant here.",
        None,
    ),
    (
        "Option A is wrong because the patient is not immunocompromised. "
        "Option B is also unlikely since there is no travel history. (C) is tempting given the "
        "eosinophilia, but",
        None,
    ),
    (
        "Option A: Lisinopril — contraindicated in pregnancy.\n"
        "Option B: Labetalol — safe in pregnancy.\n"
        "B. Hypertension can be ruled out as the primary cause because",
        None,
    ),
    (
        "The findings point toward none of the listed diagnoses; the correct choice would be "
        "an option not offered.\nAnswer: E",
        None,
    ),
    ("Answer: (B)\nWait, that's not right. Reconsidering, the answer is E.", None),
    (
        "Answer choice A is incorrect because ACE inhibitors cause hyperkalemia, not "
        "hypokalemia. Answer choice C is incorrect because",
        None,
    ),
    (
        "The answer is a deficiency of the enzyme glucocerebrosidase, leading to accumulation "
        "of glucocerebroside in macrophages.",
        None,
    ),
    (
        "Answer:\nA patient with these findings most likely has an acute exacerbation of "
        "COPD and needs bronchodilators.",
        None,
    ),
    (
        "Think step by step, then finish with a line of the form \"The answer is X\", where X "
        "is A, B, C or D.",
        None,
    ),
    ("The HbA1c is 6.9% and fasting glucose is 132 mg/dL. Type A", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_case_count() -> None:
    assert len(CASES) >= 40
