//! The built-in bilingual prompt set: everyday chat requests in Arabic and English, written
//! for this project, roughly the mix ALLaM-2-7b-instruct serves (about half Arabic, some
//! code-switching, a few with a system message or an earlier exchange).
//!
//! Prompts are short on purpose: with a chat template the prompt length is dominated by the
//! template, and the interesting variable for a chat benchmark is the answer length, which the
//! caller bounds with `max_tokens`.

use crate::dataset::ChatTurn;

/// One conversation: `(role, content)` pairs in order, ending with a user turn.
type Conversation = &'static [(&'static str, &'static str)];

const PROMPTS: &[Conversation] = &[
    // Arabic.
    &[(
        "user",
        "ما هي عاصمة المملكة العربية السعودية؟ وما أبرز معالمها؟",
    )],
    &[("user", "اشرح لي باختصار كيف تعمل الطاقة الشمسية.")],
    &[("user", "اكتب قصيدة قصيرة عن البحر.")],
    &[("user", "ما الفرق بين الذكاء الاصطناعي وتعلم الآلة؟")],
    &[("user", "لخص أهم إنجازات الدولة العباسية في فقرة واحدة.")],
    &[("user", "اقترح خطة غذائية صحية ليوم واحد.")],
    &[("user", "كيف أتعلم البرمجة بلغة بايثون من الصفر؟")],
    &[(
        "user",
        "اكتب رسالة بريد إلكتروني رسمية لطلب إجازة من العمل.",
    )],
    &[("user", "ما هي فوائد القراءة اليومية؟")],
    &[(
        "user",
        "اشرح الفرق بين الفاعل والمفعول به في النحو العربي مع أمثلة.",
    )],
    &[(
        "user",
        "ترجم الجملة التالية إلى الإنجليزية: \"العلم نور والجهل ظلام\".",
    )],
    &[("user", "ما أسباب تغير المناخ وكيف يمكن الحد منه؟")],
    &[("user", "اكتب قصة قصيرة للأطفال عن صداقة بين قطة وعصفور.")],
    &[("user", "ما هي أهم النصائح لإجراء مقابلة عمل ناجحة؟")],
    &[(
        "user",
        "قارن بين السيارات الكهربائية والسيارات التي تعمل بالبنزين.",
    )],
    &[("user", "كيف يمكنني تحسين مهارات الكتابة لدي؟")],
    &[("user", "اشرح مفهوم التضخم الاقتصادي بلغة بسيطة.")],
    &[("user", "ما هي أشهر الأكلات الشعبية في دول الخليج العربي؟")],
    &[(
        "user",
        "أعطني عشر أفكار لمشروع صغير يمكن البدء به من المنزل.",
    )],
    &[("user", "كيف أنظم وقتي بين الدراسة والعمل؟")],
    // English.
    &[(
        "user",
        "Explain the difference between TCP and UDP with examples.",
    )],
    &[("user", "Write a short poem about the desert at night.")],
    &[(
        "user",
        "Summarize the history of the Arabic alphabet in one paragraph.",
    )],
    &[("user", "What are the main causes of inflation?")],
    &[(
        "user",
        "Give me a three-day itinerary for a first visit to Riyadh.",
    )],
    &[(
        "user",
        "How does a transformer neural network process a sentence?",
    )],
    &[(
        "user",
        "Write a Python function that checks whether a string is a palindrome.",
    )],
    &[(
        "user",
        "What are good habits for staying productive while working from home?",
    )],
    &[("user", "Explain photosynthesis to a ten-year-old.")],
    &[(
        "user",
        "Draft a polite email asking a colleague to review my report.",
    )],
    &[(
        "user",
        "Compare renewable and non-renewable energy sources.",
    )],
    &[(
        "user",
        "What is the difference between a list and a tuple in Python?",
    )],
    &[("user", "Describe the water cycle step by step.")],
    &[(
        "user",
        "What should I consider when buying my first laptop?",
    )],
    &[(
        "user",
        "Explain what a database index is and when to use one.",
    )],
    &[(
        "user",
        "Tell me a short story about a young falcon learning to fly.",
    )],
    &[("user", "How can I improve my public speaking skills?")],
    // Code-switching.
    &[(
        "user",
        "Translate into Arabic: \"Knowledge is a treasure, and practice is its key.\"",
    )],
    &[(
        "user",
        "Explain the Arabic word \"كرم\" and how it is used in everyday life.",
    )],
    &[("user", "ما معنى كلمة algorithm وما أصلها العربي؟")],
    &[(
        "user",
        "Suggest five names for a coffee shop that serves قهوة عربية.",
    )],
    // With a system message or an earlier exchange.
    &[
        ("system", "أنت مساعد مفيد يجيب باللغة العربية الفصحى."),
        ("user", "ما هي أفضل طريقة لتعلم لغة جديدة؟"),
    ],
    &[
        ("system", "You are a concise assistant. Answer in English."),
        ("user", "Why is the sky blue?"),
    ],
    &[
        ("user", "مرحبا، كيف حالك؟"),
        ("assistant", "أهلاً بك! أنا بخير، كيف يمكنني مساعدتك اليوم؟"),
        ("user", "أريد نصائح للنوم الجيد."),
    ],
    &[
        ("user", "I am planning a trip to Jeddah."),
        (
            "assistant",
            "That sounds great! What would you like to know about Jeddah?",
        ),
        (
            "user",
            "Which historic places should I visit, and what is the best season to go?",
        ),
    ],
];

/// How many conversations the built-in set holds.
pub(crate) fn len() -> usize {
    PROMPTS.len()
}

/// Conversation `idx` (taken modulo the set size) as owned chat turns.
pub(crate) fn conversation(idx: usize) -> Vec<ChatTurn> {
    PROMPTS[idx % PROMPTS.len()]
        .iter()
        .map(|(role, content)| ChatTurn {
            role: (*role).to_owned(),
            content: (*content).to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_arabic(c: char) -> bool {
        ('\u{0600}'..='\u{06FF}').contains(&c)
    }

    #[test]
    fn set_is_bilingual_and_well_formed() {
        assert!(len() >= 40, "{} prompts", len());
        let mut n_arabic = 0;
        let mut n_english = 0;
        for idx in 0..len() {
            let turns = conversation(idx);
            let last = turns.last().expect("every conversation has a turn");
            assert_eq!(
                last.role, "user",
                "conversation {idx} must end with the user"
            );
            // The Llama-2 template wants user/assistant alternation after an optional system.
            let body: Vec<&str> = turns
                .iter()
                .map(|turn| turn.role.as_str())
                .skip_while(|role| *role == "system")
                .collect();
            for (pos, role) in body.iter().enumerate() {
                let expected = if pos % 2 == 0 { "user" } else { "assistant" };
                assert_eq!(*role, expected, "conversation {idx}");
            }
            let text: String = turns.iter().map(|turn| turn.content.as_str()).collect();
            if text.chars().any(is_arabic) {
                n_arabic += 1;
            }
            if text.chars().any(|c| c.is_ascii_alphabetic()) {
                n_english += 1;
            }
        }
        assert!(
            n_arabic >= 20 && n_english >= 20,
            "{n_arabic} / {n_english}"
        );
        assert_eq!(conversation(len()), conversation(0));
    }
}
